"""``reg.compiled_step(optimizer)``: the folded terms and the optimizer's update in one compiled graph.

``torch.compile(opt.step)`` traces the fold's pre-hook too, but torch's optimizers break the
graph where ``step()`` begins (``_use_grad_for_differentiable`` does, so that the update is traced
with gradients off and updates its tensors in place). The fold is then a graph of its own: one
more pass that reads every weight and gradient and writes the gradient back.

The step built here enters the optimizer's own ``step`` below that break, with gradients already
off, and traces the fold and the update as one function. Inductor then computes each term's
gradient inside the update's loop over the weight: no pass of its own. ``group_lasso``'s slice
norms (a reduction) are computed eagerly before it, into one buffer the graph reads: inductor's
CPU backend fails to compile that reduction fused into an update (torch 2.13), and a graph of
the norms alone took 5.6 ms where eager norms over stacked runs of the weights took 1.0 ms (400
weights of 64x64, one thread). Everything else a step does runs as ``opt.step()`` runs it,
eagerly and in the same order: the pre-hooks (the fold's counts the step and leaves the terms to
the graph), then the graph, then the post-hooks (regdsl's bookkeeping, the schedules).
"""

from __future__ import annotations

import functools
import itertools
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from .errors import RegUsageError
from .fold import FoldPlan


def compiled_step(
    optimizer: torch.optim.Optimizer, plan: FoldPlan, options: dict[str, Any], reg: Any
) -> Callable[..., Any]:
    """A bound method to put in place of ``optimizer.step``: ``opt.step = reg.compiled_step(opt)``.
    A method, not just a callable: an LR scheduler built afterwards wraps ``opt.step`` through
    its ``__func__`` to count the steps."""
    compiled = CompiledStep(optimizer, plan, options, reg)

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        return compiled(self, closure)

    return types.MethodType(step, optimizer)


class CompiledStep:
    """What :func:`compiled_step` runs for one optimizer and its fold plan."""

    def __init__(self, optimizer: torch.optim.Optimizer, plan: FoldPlan, options: dict[str, Any], reg: Any):
        self._plan = plan
        # Held: the hooks this step runs (the step counter, the schedules) go when the regularizer does,
        # and the graph would go on folding at frozen strengths. While it is the optimizer's step, the
        # regularizer stays, even if the caller drops it.
        self._reg = reg
        self._update = _inner_step(type(optimizer).step)
        self._options = options
        self._graph = self._compiled()
        # One graph per state of the plan (regdsl.fold.FoldPlan.state): a weight frozen for a phase and
        # unfrozen again takes its graph up again, not a new compile each time.
        self._graphs = {plan.state(): self._graph}
        # torch's own wrapper: the global and the optimizer's step hooks, around _run.
        self._hooked = torch.optim.Optimizer.profile_hook_step(self._run)

    def __call__(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
        if self._plan.retired:
            raise RegUsageError(
                "this compiled step folds for a regularizer that was detached (penalty() holds its terms again): "
                "del optimizer.step to step without it, or make a new one with reg.compiled_step(optimizer) after attach"
            )
        args = (optimizer,) if closure is None else (optimizer, closure)
        self._plan.deferred = True
        try:
            return self._hooked(*args)  # the fold's pre-hook refuses a closure, as on opt.step()
        finally:
            self._plan.deferred = False

    def _run(self, optimizer: torch.optim.Optimizer, closure: Any = None) -> Any:
        if closure is not None:  # no fold pre-hook (nothing to fold) refused it: the update would recompute the gradients
            raise RegUsageError("reg.compiled_step(optimizer) takes no closure: see docs/fold.md, Closures")
        if self._plan.refresh():  # eagerly: re-bucketing after model.to(...) is not for a graph to trace
            # A weight frozen or unfrozen is guarded by identity alone: the old graph would go on folding as
            # it was traced. The graph of this state, traced anew where there is none (a new code object:
            # dynamo keeps graphs per code object).
            state = self._plan.state()
            if state not in self._graphs:
                self._graphs[state] = self._compiled()
            self._graph = self._graphs[state]
        scale = getattr(optimizer, "grad_scale", None)
        # Off before the graph starts, as _use_grad_for_differentiable turns it off after its break.
        with torch.set_grad_enabled(bool(optimizer.defaults.get("differentiable", False))):
            norms = self._plan.slice_norms()  # None for each bucket not group_lasso
            return self._graph(optimizer, scale, norms)

    def _compiled(self) -> Callable[..., Any]:
        return torch.compile(types.MethodType(_own_code(CompiledStep._fold_and_update), self), **self._options)

    def _fold_and_update(self, optimizer: torch.optim.Optimizer, scale: Any, norms: Any) -> Any:
        # Read first, dynamo marks the optimizer's parameters static (as the update would), so the
        # fold's reads of them are guarded by identity, not by a full tensor check: 400 such
        # guards cost 0.1 ms a step on the 400-layer MLP.
        optimizer.param_groups  # noqa: B018
        self._plan.apply(scale, norms)
        return self._update(optimizer)


_STEPS = itertools.count(1)


def _own_code(fn: Any) -> Any:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs and their guards per code
    object: shared by every compiled step in a process, a second optimizer's step would be a
    recompile of the first's, count against dynamo's recompile limit (past it, a step runs eagerly),
    and with torch 2.13 fail for SGD with momentum (``SpeculationLogDivergence``) when the second
    has more param groups; ``torch.compile(opt.step)`` fails alike there."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_STEPS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


@functools.cache
def _torch_wrappers() -> frozenset[Any]:
    """The code of the two wrappers torch puts around every optimizer's ``step``: the hooks'
    (``Optimizer.profile_hook_step``) and the grad mode's, whose graph break this step avoids."""
    wrappers = [torch.optim.Optimizer.profile_hook_step]
    # Private in torch: without it (a later torch), the step still runs, the fold as a graph of its own.
    wrappers += [getattr(sys.modules.get("torch.optim.optimizer"), "_use_grad_for_differentiable", None)]
    return frozenset(wrap(lambda *args: None).__code__ for wrap in wrappers if wrap is not None)


def _inner_step(step: Any) -> Any:
    """The optimizer class's ``step`` without torch's wrappers (and nothing else unwrapped)."""
    while getattr(step, "__code__", None) in _torch_wrappers() and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step
