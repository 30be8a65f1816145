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
from .guards import without_gradients


def step_hooks(
    reg_ref: Any, optimizer: torch.optim.Optimizer, plan: FoldPlan | None, busy: bool, by_hand: FoldCalls | None = None
) -> list[Any]:
    """The hooks ``attach()`` installs on one optimizer, as handles; ``plan``: what it folds.

    ``busy`` (post-step terms, activity values to drop, anything scheduled) needs the full
    bookkeeping after each step (``reg._advance``). Otherwise a step only counts: inside the
    fold's pre-hook when there is one, else in a post-hook that does nothing more. ``by_hand``:
    the terms are folded by ``reg.fold()`` (``fold_hook=False``), which each step checks.
    """
    handles = []
    count = functools.partial(eager(_count), reg_ref)
    counts = plan is not None and bool(plan) and not busy
    if plan is not None and plan:
        handles.append(optimizer.register_step_pre_hook(functools.partial(_fold_hook, plan, count if counts else None)))
    if not counts:
        post = functools.partial(eager(_advance), reg_ref) if busy else functools.partial(_count_after, count)
        if by_hand is not None:
            post = functools.partial(eager(_checked), by_hand, post)
        handles.append(optimizer.register_step_post_hook(post))
    return handles


def remove_all(handles: list[Any]) -> None:
    """Remove every hook handle in ``handles``, emptying it (at ``detach()`` and when the regularizer dies)."""
    while handles:
        handles.pop().remove()


def release(handles: list[Any]) -> None:
    """The regularizer's finalizer: it was garbage-collected, so its hooks stop, and each optimizer whose
    hooks applied terms is told at its next step (:class:`Orphan`).

    The collector runs wherever an allocation triggers it, inside torch's loop over an optimizer's step
    hooks too, where removing or adding a hook breaks that loop ("OrderedDict mutated during
    iteration"). So no hook is removed or added here: each is replaced in place (what it held, the
    fold's buffers among it, goes) by a no-op that stays registered, or by the warning."""
    for handle in handles:
        if not isinstance(handle, Orphan):
            _replace(handle, _inert)
    for handle in handles:
        if isinstance(handle, Orphan):
            handle.orphan()
    handles.clear()


def _replace(handle: Any, hook: Callable[..., None]) -> None:
    hooks = handle.hooks_dict_ref()
    if hooks is not None and handle.id in hooks:
        hooks[handle.id] = hook  # a new value for a key: torch's loop over the hooks goes on, and calls it


def _inert(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """What a garbage-collected regularizer's step hook becomes (:func:`release`)."""


class Orphan:
    """Stands in a regularizer's hook list for one optimizer whose step hooks apply terms (folded
    gradients, post-step terms, a scheduled decay). Nothing but the regularizer holds those terms, so
    one dropped while attached (``reg.attach(opt, fold=True)`` in a function that returns ``opt``)
    would stop applying them silently. Instead that optimizer's next step warns, once, from the
    place of its first hook; a step that never comes (training is over) says nothing. ``detach()``
    removes the hooks, silently. The terms are named by kind (``folded terms``, ``post-step terms``,
    ``a decay schedule``)."""

    def __init__(self, handles: list[Any], what: list[str]):
        self._first = handles[0]  # the optimizer's hooks: a fold's pre-hook, else its post-hook
        self._what = what

    def remove(self) -> None:
        """``detach()``: the hooks themselves are removed beside it."""

    def orphan(self) -> None:
        message = (
            f"the regularizer attached to this optimizer was garbage-collected, and with it what its hooks did "
            f"({', '.join(self._what)}): from this step on they go without. Keep a reference to it for as long "
            "as it trains (self.reg = reg), or reg.detach() first"
        )
        warned: list[bool] = []
        since = torch.utils.hooks.RemovableHandle.next_id  # the id of the next hook registered anywhere

        def warn(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if not warned:
                warned.append(True)
                if not _attached_since(optimizer, since):  # a new one took its place (a notebook cell run again)
                    warnings.warn(RegDslWarning(message), stacklevel=caller_stacklevel(through_torch=True))

        _replace(self._first, warn)


def _attached_since(optimizer: torch.optim.Optimizer, since: int) -> bool:
    """Whether a live regularizer's hooks were put on ``optimizer`` after the dropped one went (hook ids
    from ``since`` on): one attached before, living beside it, takes nobody's place. Such hooks hold
    their regularizer by weak reference."""
    hooks = [
        hook
        for hooks in (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks)
        for key, hook in hooks.items()
        if key >= since
    ]
    while hooks:
        hook = hooks.pop()
        if isinstance(hook, weakref.ref) and hook() is not None:
            return True
        if isinstance(hook, functools.partial):
            hooks += hook.args
    return False


class FoldCalls:
    """``attach(opt, fold=True, fold_hook=False)``: whether ``reg.fold()`` ran since the optimizer's
    previous step. A step without it applied none of the folded terms; it warns, once.

    A second call with nothing in between would add the terms twice: refused. "Nothing in between"
    is read off one folded tensor's gradient (the smallest trainable one, picked again once it is
frozen): the same tensor at the version the
    fold left it. A backward, ``zero_grad()`` or unscaling changes it; a step that a ``GradScaler``
    skipped is followed by those before the next fold, so it is not taken for a second call."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.folded = False
        self._warned = False
        self._params = params
        self._probe = self._smallest()
        self._mark: tuple[torch.Tensor, int] | None = None

    def _smallest(self) -> torch.Tensor | None:
        trainable = [p for p in self._params if p.requires_grad]  # a frozen one's gradient never moves
        return min(trainable, key=torch.Tensor.numel) if trainable else None

    def check(self) -> None:
        """Before a fold: refused when the previous one's gradient is untouched."""
        mark, probe = self._mark, self._probe
        if mark is not None and probe is not None and probe.grad is mark[0] and mark[0]._version == mark[1]:
            raise RegUsageError(
                "reg.fold() ran already on these gradients: a second call would add the folded terms twice. "
                "Call it once per optimizer step, after the last backward and before the update"
            )

    def done(self) -> None:
        self.folded = True
        if self._probe is None or not self._probe.requires_grad:  # frozen since: the fold leaves it alone
            self._probe = self._smallest()
        grad = self._probe.grad if self._probe is not None else None
        self._mark = (grad, grad._version) if grad is not None else None

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.folded and not self._warned and not without_gradients(optimizer):
            self._warned = True
            warnings.warn(
                RegDslWarning(
                    "an optimizer step ran with no reg.fold() since the step before: with "
                    "attach(optimizer, fold=True, fold_hook=False) the folded terms apply only through reg.fold(), "
                    "once per optimizer step, after the last backward and before the update (Lightning's "
                    "RegularizationCallback calls it after each backward Lightning runs: in manual optimization, "
                    "self.manual_backward(loss), not loss.backward())"
                ),
                stacklevel=caller_stacklevel(through_torch=True),
            )
        self.folded = False
        self._mark = None


def _checked(
    by_hand: FoldCalls, post: Callable[..., None], optimizer: torch.optim.Optimizer, args: Any, kwargs: Any
) -> None:
    by_hand.stepped(optimizer)
    post(optimizer, args, kwargs)



def _advance(reg_ref: Any, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    reg = reg_ref()
    if reg is not None:
        reg._advance(optimizer)


def _count(reg_ref: Any, optimizer: torch.optim.Optimizer) -> None:
    reg = reg_ref()
    if reg is not None:
        reg._step += 1  # nothing is scheduled: no strength moves, only reg.step and state_dict() read it
        if reg._watch.active:
            reg._watch.stepped(id(optimizer), optimizer)


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
