"""``group_lasso`` folded for weights of one shape as one stacked tensor, off the CPU.

On CUDA a ``_foreach`` op is one kernel for dozens of tensors only when each tensor of one list
has the shape of its partner in the others. ``_foreach_addcdiv_(grads, weights, norms)`` breaks
that (the norms, ``(out, 1)``, broadcast over an ``(out, in)`` weight), so torch runs it as one
kernel per weight, after one norm kernel per weight. On an H200 (2026-12-04, benchmarks/term_work.py)
that made ``group_lasso``'s fold on the 400-layer MLP 9.3 ms, where elastic net's took 2.7 ms.

Weights of one shape (every block of a transformer, the blocks of a ResNet stage) are stacked
instead: one copy, one norm kernel, one clamp, one division in place, and one ``_foreach_add_``
of the quotient's rows into their gradients, whatever the number of weights. The stack is a
temporary that the device's caching allocator hands back at the next step. Only weights of at
most :data:`STACKED` bytes: past that the copy's memory traffic costs more than the launches it
saves. The CPU keeps its own path (:mod:`regdsl.fold_kernels`: scratch buffers, and each large
weight updated while it is in cache), where a temporary this size would page-fault at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

STACKED = 1 << 20  # bytes of one weight
STACK_LIMIT = 64 << 20  # bytes of one stack
# A stack costs five kernels (copy, norms, clamp, division, add), n weights one at a time 2n: on the
# H200, stacks of two made tiny GPT-2's fold 0.41 ms against 0.25 (its block weights come in pairs).
MIN_STACK = 3


def shape_groups(params: Sequence[torch.Tensor], others: Sequence[tuple[int, ...]]) -> list[tuple[list[int], tuple[int, ...]]]:
    """Indices of :data:`MIN_STACK` or more weights with one shape and one norm layout (``others``: the dimensions
    each slice's norm runs over), at most :data:`STACK_LIMIT` bytes together, and the norm's dimensions
    in the stack."""
    by_shape: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for k, (p, dims) in enumerate(zip(params, others)):
        if p.ndim >= 2 and 0 < p.numel() * p.element_size() <= STACKED:
            by_shape.setdefault((tuple(p.shape), dims), []).append(k)
    groups = []
    for (_, dims), indices in by_shape.items():
        first = params[indices[0]]
        per = max(MIN_STACK, STACK_LIMIT // (first.numel() * first.element_size()))
        for a in range(0, len(indices), per):
            if len(indices[a : a + per]) >= MIN_STACK:
                groups.append((indices[a : a + per], tuple(d + 1 for d in dims)))
    return groups


def fold_stacked(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    groups: Sequence[tuple[list[int], tuple[int, ...]]],
    lam: float,
    tiny: float,
) -> None:
    """``g += λ·w_i/‖w_i‖₂`` for every weight of ``groups``; an all-zero slice's norm is read as
    ``tiny`` (the smallest normal number), so it adds 0 with no mask, and a NaN stays NaN.
    The weights' dtype is the norms' (float32 or float64), so the division is done in place."""
    for indices, dims in groups:
        stacked = torch.stack([params[k] for k in indices])
        norms = torch.linalg.vector_norm(stacked, 2, dim=dims, keepdim=True).clamp_min_(tiny)
        torch._foreach_add_([grads[k] for k in indices], stacked.div_(norms).unbind(0), alpha=lam)


def stacked_norms(
    params: Sequence[torch.Tensor],
    groups: Sequence[tuple[list[int], tuple[int, ...]]],
    views: Sequence[torch.Tensor | None],
) -> None:
    """Each weight's slice norms into its view of a buffer (a compiled step's, taken eagerly before
    its graph): per stack, one copy, one norm kernel and one ``_foreach_copy_``."""
    for indices, dims in groups:
        norms = torch.linalg.vector_norm(torch.stack([params[k] for k in indices]), 2, dim=dims, keepdim=True)
        torch._foreach_copy_([views[k] for k in indices], norms.unbind(0))  # type: ignore[misc]
