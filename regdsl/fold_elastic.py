"""Elastic net folded in one sweep: ``l1`` and ``l2`` on the same large CPU tensors.

Folded apart, ``l1 a l2 b`` on one tensor reads it twice and its gradient twice (``g += b·w``
for ``l2``; ``sign(w)`` into the scratch buffer, then ``g += a·sign(w)`` for ``l1``), each pass
over the whole tensor, so on a model the size of ViT-B every pass comes from memory. Here a
tensor is swept in slices of about :data:`SLICE` bytes along its first dimension, and each slice
gets both terms while it is in cache::

    g[s] += b·w[s];  g[s] += a·sign(w[s])        (sign written into a buffer of one slice)

The fold alone on ViT-B's 86M weights (one thread, interleaved rounds): 61 to 64 ms against 83 ms apart.
The formulas are :mod:`regdsl.fold`'s; the strengths are the two terms' own, so schedules move
each as before. With a tensor strength (a compiled step, a fused optimizer under ``GradScaler``)
the two terms fold apart as before: inside a graph, inductor fuses them anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import sharded
from .fold_batching import gradients
from .fold_kernels import Bucket
from .penalties import SMALL, LossItem

# Bytes of one slice: the weights', the gradient's and sign's slices together stay in a core's L2.
SLICE = 1 << 20


def elastic_pairs(items: Sequence[LossItem], scratch_devices: Sequence[str]) -> list[tuple[LossItem, LossItem]]:
    """``(l1 item, l2 item)`` of each tensor with exactly one of each, larger than ``SMALL`` bytes
    (smaller ones stay in their buckets' ``_foreach`` calls), on a device in ``scratch_devices``
    (the CPU: where the sweep was measured) and not sharded."""
    by_param: dict[int, dict[str, list[LossItem]]] = {}
    for item in items:
        if item.family in ("l1", "l2"):
            by_param.setdefault(id(item.param), {}).setdefault(item.family, []).append(item)
    pairs = []
    for found in by_param.values():
        l1, l2 = found.get("l1", []), found.get("l2", [])
        if len(l1) != 1 or len(l2) != 1:
            continue
        p = l1[0].param
        if p.device.type in scratch_devices and p.numel() * p.element_size() > SMALL and not sharded.is_sharded(p):
            pairs.append((l1[0], l2[0]))
    return pairs


class ElasticBucket:
    """The ``l1`` bucket and the ``l2`` bucket of the same tensors (in the same order), folded
    together eagerly; anywhere else each folds as its own :class:`~regdsl.fold_kernels.Bucket`."""

    def __init__(self, l1: Bucket, l2: Bucket):
        self.l1, self.l2 = l1, l2
        self.params = l1.params
        self.device, self.dtype = l1.device, l1.dtype
        self.scheduled = l1.scheduled or l2.scheduled
        rows = max(p.numel() // p.shape[0] for p in self.params)
        # One slice's sign(w), kept across steps: at least one row of the widest tensor.
        self._buffer = torch.empty(max(SLICE // self.params[0].element_size(), rows), dtype=self.dtype, device=self.device)
        self._views: dict[torch.Size, torch.Tensor] = {}

    def needs_scratch(self, p: torch.Tensor) -> bool:
        return False  # its own buffer of one slice

    def set_views(self, views: list[torch.Tensor | None]) -> None:
        pass

    def set_step(self, step: int) -> None:
        self.l1.set_step(step)
        self.l2.set_step(step)

    def stale(self) -> str | None:
        return self.l1.stale()  # the two buckets hold the same tensors

    def retrain(self) -> None:
        self.l1.retrain()
        self.l2.retrain()

    @property
    def trainable(self) -> list[bool]:
        return self.l1.trainable

    def slice_norms(self) -> None:
        return None

    def fold(self, scale: torch.Tensor | None, norms: torch.Tensor | None = None, checked: bool = False) -> None:
        if scale is not None or torch.compiler.is_compiling():
            self.l1.fold(scale, None, checked)
            self.l2.fold(scale, None, checked)
            return
        # Gradients first, as each bucket apart makes them: at strength 0 a missing one is zeros, as
        # the loss path's autograd would give it.
        params, grads, _ = gradients(self.params, checked)
        a, b = self.l1.value, self.l2.value
        if not (a or b):
            return
        elements = self._buffer.numel()
        for p, g in zip(params, grads):
            # Slices along dim 0 are views whatever the layout (channels_last included).
            step = max(1, elements // (p.numel() // p.shape[0]))
            for s in range(0, p.shape[0], step):
                w, gs = p[s : s + step], g[s : s + step]
                if b:
                    gs.add_(w, alpha=b)
                if a:
                    gs.add_(torch.sign(w, out=self._view(w.shape)), alpha=a)

    def _view(self, shape: torch.Size) -> torch.Tensor:
        """The buffer's view of one slice's shape, made once per shape: a view costs as much as a
        small kernel."""
        out = self._views.get(shape)
        if out is None:
            out = self._views[shape] = self._buffer[: shape.numel()].view(shape)
        return out


__all__ = ["SLICE", "ElasticBucket", "elastic_pairs"]
