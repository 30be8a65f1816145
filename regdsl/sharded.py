"""Parameters sharded as DTensors (FSDP2's ``fully_shard``): every term gets the value and the
gradient of the unsharded weight.

FSDP2 keeps each parameter as a DTensor whose local tensor is this rank's shard (``Shard(0)``
on a 1-D mesh; HSDP adds a ``Replicate`` dimension). What each term needs:

* ``l1``, ``l2``, ``l2 ... to``: the sum over the local shard, then one all-reduce of that
  scalar per bucket over the mesh dimensions that shard it. The gradient is local and exact.
  A reference given unsharded is cut to the local shard, without communication.
* ``group_lasso``, ``orthogonal`` and ``max_norm`` need whole slices or the whole matrix: they
  work on the gathered weight (``DTensor.full_tensor()``, one all-gather of the tensor per step),
  and each rank keeps its own chunk of the gradient or of the renormed weight.
* ``l1 ... prox`` is elementwise: on the local shard.

Placements other than ``Shard`` and ``Replicate`` (``Partial``) are refused when compiling.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist


@functools.cache
def dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return None
    return DTensor


def active() -> bool:
    """Whether a process group exists; no DTensor can before one does (and the import is skipped)."""
    return dist.is_available() and dist.is_initialized()


def is_sharded(t: Any) -> bool:
    if not active():
        return False
    kind = dtensor_type()
    return kind is not None and isinstance(t, kind)


def is_sharded_type(kind: type) -> bool:
    if not active():
        return False
    dtensor = dtensor_type()
    return dtensor is not None and issubclass(kind, dtensor)


def unsupported(p: torch.Tensor) -> str | None:
    """Why regdsl cannot compute terms on this DTensor, or None."""
    bad = [type(pl).__name__ for pl in p.placements if not (pl.is_shard() or pl.is_replicate())]  # type: ignore[attr-defined]
    if bad:
        return f"a DTensor placed as {', '.join(bad)} holds no whole values to regularize; only Shard and Replicate are supported"
    return None


def mesh_key(p: torch.Tensor) -> tuple[Any, ...] | None:
    """What a bucket of sharded parameters must share: the mesh and the placements."""
    return (id(p.device_mesh), tuple(p.placements)) if is_sharded(p) else None  # type: ignore[attr-defined]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def full(t: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor, differentiable: its backward hands each rank its shard's gradient."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def chunk_of(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of an unsharded ``whole``, cut as ``like`` is sharded (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()  # type: ignore[attr-defined]


def laid_out_like(ref: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A sharded reference laid out as ``p`` is, so that its local part is the ``w₀`` of ``p``'s
    local shard: one all-gather, when the mesh or the placements differ (a state_dict of the
    model sharded otherwise, or on HSDP's 2-D mesh); the whole tensor for an unsharded ``p``."""
    if not is_sharded(ref):
        return ref
    if is_sharded(p) and ref.device_mesh == p.device_mesh and tuple(ref.placements) == tuple(p.placements):  # type: ignore[attr-defined]
        return ref
    whole = ref.full_tensor()  # type: ignore[attr-defined]
    if not is_sharded(p):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)  # type: ignore[attr-defined]


def local_reference(ref: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``w₀`` for the local shard: a sharded reference's own shard (laid out as ``p`` is, by
    :func:`laid_out_like`), or the cut of an unsharded one."""
    return ref.to_local() if is_sharded(ref) else chunk_of(ref, p)  # type: ignore[attr-defined]


def summed(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The sum over every shard of a rank's ``value`` (its sum over its shard), with the gradient
    of ``value`` itself: the other ranks' parts come in as constants."""
    groups = [p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard()]  # type: ignore[attr-defined]
    if not groups:
        return value
    total = value.detach().clone()
    for group in groups:
        dist.all_reduce(total, group=group)
    return value + (total - value.detach())


@torch.no_grad()
def fold(family: str, term: Any, lam: float, params: list[torch.Tensor], grads: list[torch.Tensor], refs: list[Any], acc: torch.dtype) -> None:
    """Add ``lam`` times each term's gradient to the local shards of ``grads``."""
    for k, (p, g) in enumerate(zip(params, grads)):
        w, out = p.to_local(), g.to_local()  # type: ignore[attr-defined]
        if family == "l2":
            out.add_(w, alpha=lam)
        elif family == "l1":
            out.add_(torch.sign(w), alpha=lam)
        elif family == "l2_to":
            out.add_(w - local_reference(refs[k], p), alpha=lam)
        else:
            whole = p.full_tensor().to(acc)  # type: ignore[attr-defined]
            step = _group_lasso_gradient(whole, term.dim) if family == "group_lasso" else _orthogonal_gradient(whole)
            out.add_(chunk_of(step.mul_(lam).to(p.dtype), p))


def _group_lasso_gradient(w: torch.Tensor, dim: int) -> torch.Tensor:
    if w.ndim == 1:
        return torch.sign(w)
    keep = dim % w.ndim
    norms = torch.linalg.vector_norm(w, 2, dim=[d for d in range(w.ndim) if d != keep], keepdim=True)
    return w / norms.clamp_min(torch.finfo(w.dtype).tiny)


def _orthogonal_gradient(w: torch.Tensor) -> torch.Tensor:
    from .term_math import _gram_minus_identity  # here: term_math imports this module

    gram, wide = _gram_minus_identity(w, w.dtype)
    m = w.reshape(w.shape[0], -1)
    return (4 * (gram @ m if wide else m @ gram)).reshape(w.shape)


@torch.no_grad()
def renorm_(p: torch.Tensor, dim: int, limit: float, renorm: Any) -> None:
    """``renorm`` (the plain max-norm rule) on the gathered weight; each rank keeps its chunk."""
    whole = p.full_tensor()  # type: ignore[attr-defined]
    renorm(whole, dim, limit)
    p.to_local().copy_(chunk_of(whole, p))  # type: ignore[attr-defined]
