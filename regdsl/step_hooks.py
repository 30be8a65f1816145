"""The hooks ``reg.attach(optimizer)`` installs on an optimizer's step: the fold before the update
(:mod:`regdsl.fold`), and the step bookkeeping after it (``reg._advance``: post-step terms, the step
counter, every scheduled strength). docs/fold.md has the table of which hooks which rules need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .errors import RegUsageError
from .fold import FoldPlan
from .fold_kernels import eager


def step_hooks(reg_ref: Any, optimizer: torch.optim.Optimizer, plan: FoldPlan | None, busy: bool) -> list[Any]:
    """The hooks ``attach()`` installs on one optimizer, as handles; ``plan``: what it folds.

    ``busy`` (post-step terms, activity values to drop, anything scheduled) needs the full
    bookkeeping after each step (``reg._advance``). Otherwise a step only counts: inside the
    fold's pre-hook when there is one, else in a post-hook that does nothing more.
    """
    handles = []
    count = functools.partial(eager(_count), reg_ref)
    counts = plan is not None and bool(plan) and not busy
    if plan is not None and plan:
        handles.append(optimizer.register_step_pre_hook(functools.partial(_fold_hook, plan, count if counts else None)))
    if not counts:
        post = functools.partial(eager(_advance), reg_ref) if busy else functools.partial(_count_after, count)
        handles.append(optimizer.register_step_post_hook(post))
    return handles


def remove_all(handles: list[Any]) -> None:
    """Remove every hook handle in ``handles``, emptying it (at ``detach()`` and when the regularizer dies)."""
    while handles:
        handles.pop().remove()


def _advance(reg_ref: Any, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    reg = reg_ref()
    if reg is not None:
        reg._advance(optimizer)


def _count(reg_ref: Any, optimizer: torch.optim.Optimizer) -> None:
    reg = reg_ref()
    if reg is not None:
        reg._step += 1  # nothing is scheduled: no strength moves, only reg.step and state_dict() read it
        if reg._watch.active:
            reg._watch.stepped(id(optimizer))


def _count_after(
    count: Callable[[torch.optim.Optimizer], None], optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
) -> None:
    count(optimizer)


def _fold_hook(
    plan: FoldPlan,
    count: Callable[[torch.optim.Optimizer], None] | None,
    optimizer: torch.optim.Optimizer,
    args: Any,
    kwargs: Any,
) -> None:
    # args[0] is the optimizer itself; a closure comes positionally or by keyword.
    if (len(args) > 1 and args[1] is not None) or kwargs.get("closure") is not None:
        # The closure recomputes the gradients inside step(), after this hook: the terms would be lost.
        raise RegUsageError(
            "attach(optimizer, fold=True) cannot fold into a step that takes a closure (LBFGS): "
            "attach without fold and add reg.penalty() to the loss the closure computes"
        )
    plan(getattr(optimizer, "grad_scale", None))
    if count is not None:
        count(optimizer)
