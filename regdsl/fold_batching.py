"""How the eager fold (:mod:`regdsl.fold_kernels`) batches a bucket's tensors: their gradients made
ready for in-place adds, index ranges of a bounded size for ``_foreach`` calls, runs of small
same-shaped tensors whose slice norms one stacked kernel computes, and the dimensions a slice's norm
runs over."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gradients(
    params: list[torch.Tensor], checked: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], range | list[int]]:
    """Each parameter's gradient, ready for in-place adds, and the indices of the parameters kept.
    A parameter without one gets zeros (the term alone is its gradient, as the loss path would
    give it); a sparse one (``Embedding(sparse=True)``) turns dense, as autograd's sum with a
    dense term would make it. ``checked``: the fold plan found every one there, dense and trainable."""
    grads = [p.grad for p in params]
    if checked:
        return params, grads, range(len(params))
    for p, g in zip(params, grads):  # a loop, not any(...): a generator costs as much as the check on a few tensors
        if g is None or not p.requires_grad or g.layout != torch.strided:
            break
    else:
        return params, grads, range(len(params))  # type: ignore[return-value]
    kept, out = [], []
    for k, (p, g) in enumerate(zip(params, grads)):
        if not p.requires_grad:
            # Frozen since compile(): the loss path gives it no gradient either, whatever .grad it kept
            # (zero_grad(set_to_none=False) leaves a zero one, which the optimizer still steps).
            continue
        if g is None:
            p.grad = g = torch.zeros_like(p)
        elif g.layout != torch.strided:
            p.grad = g = g.to_dense()
        kept.append(k)
        out.append(g)
    return [params[k] for k in kept], out, kept


def slice_dims(p: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The dimensions of ``p`` other than ``dim``: a slice's norm runs over them."""
    keep = dim % p.ndim if p.ndim else 0
    return tuple(d for d in range(p.ndim) if d != keep)


def same_shape_runs(params: Sequence[torch.Tensor], small: int, limit: int) -> list[tuple[int, int]]:
    """Index ranges of at least 2 consecutive tensors of one shape (two or more dimensions), each of
    at most ``small`` bytes and together at most ``limit``."""
    out, start = [], 0
    for k in range(1, len(params) + 1):
        first = params[start]
        nbytes = first.numel() * first.element_size()
        if k < len(params) and params[k].shape == first.shape and (k - start + 1) * nbytes <= limit:
            continue
        if k - start >= 2 and first.ndim >= 2 and nbytes <= small:
            out.append((start, k))
        start = k
    return out


def chunks(params: Sequence[torch.Tensor], limit: int) -> list[tuple[int, int]]:
    """Consecutive index ranges of at most ``limit`` bytes (a larger tensor alone)."""
    out, start, size = [], 0, 0
    for k, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if size and size + nbytes > limit:
            out.append((start, k))
            start, size = k, 0
        size += nbytes
    if start < len(params):
        out.append((start, len(params)))
    return out
