"""The hooks ``reg.attach(optimizer)`` installs on an optimizer's step: the fold before the update
(:mod:`regdsl.fold`), and the step bookkeeping after it (``reg._advance``: post-step terms, the step
counter, every scheduled strength). docs/fold.md has the table of which hooks which rules need.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .errors import RegDslWarning, RegUsageError, caller_stacklevel
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


def release(handles: list[Any]) -> None:
    """The regularizer's finalizer: it was garbage-collected, so its hooks go, and each optimizer whose
    hooks applied terms is told at its next step (:class:`Orphan`)."""
    for handle in handles:
        if isinstance(handle, Orphan):
            handle.orphan()
    remove_all(handles)


class Orphan:
    """Stands in a regularizer's hook list for one optimizer whose step hooks apply terms (folded
    gradients, post-step terms, a scheduled decay). Nothing but the regularizer holds those terms, so
    one dropped while attached (``reg.attach(opt, fold=True)`` in a function that returns ``opt``)
    would stop applying them silently. Instead that optimizer's next step warns, once; a step that
    never comes (training is over) says nothing. ``detach()`` removes it with the hooks, silently.
    The terms are named by kind (``folded terms``, ``post-step terms``, ``a decay schedule``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, what: list[str]):
        self._optimizer = weakref.ref(optimizer)
        self._what = what

    def remove(self) -> None:
        """``detach()`` (or the end, after :meth:`orphan`): nothing is registered yet."""

    def orphan(self) -> None:
        optimizer = self._optimizer()
        if optimizer is None:
            return
        message = (
            f"the regularizer attached to this optimizer was garbage-collected, and with it what its hooks did "
            f"({', '.join(self._what)}): this step and the next go without. Keep a reference to it for as long "
            "as it trains (self.reg = reg), or reg.detach() first"
        )
        warned: list[bool] = []

        # It stays, a no-op after warning: a hook removed while torch runs the step's hooks breaks their loop.
        def warn(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not warned:
                warned.append(True)
                warnings.warn(RegDslWarning(message), stacklevel=caller_stacklevel(through_torch=True))

        optimizer.register_step_pre_hook(warn)


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
