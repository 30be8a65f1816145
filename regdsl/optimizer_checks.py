"""What an optimizer given to ``attach`` or ``after_step`` must be, checked before anything is
installed or changed: an optimizer with torch's step hooks (a framework's wrapper is seen through),
one that steps the compiled model's tensors, and, for several, a split of the model between them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import RegDslWarning, RegUsageError, caller_stacklevel, name_list
from .schedule import live

if TYPE_CHECKING:
    from .compiler import Regularizer


def optimizer_list(optimizers: Any) -> list[torch.optim.Optimizer]:
    """``attach``'s argument as a list: one optimizer, or a list or tuple of them, each unwrapped."""
    found = [optimizers] if hasattr(optimizers, "param_groups") else optimizers
    if not isinstance(found, (list, tuple)) or not found or not all(hasattr(o, "param_groups") for o in found):
        raise RegUsageError(f"attach() takes an optimizer or a non-empty list of optimizers, got {optimizers!r}")
    found = [unwrapped(o) for o in found]
    for o in found:
        if not has_step_hooks(o):
            raise RegUsageError(
                f"attach() needs an optimizer with torch's step hooks (a torch.optim.Optimizer whose __init__ ran); "
                f"{type(o).__name__} has none"
            )
    if len({id(o) for o in found}) < len(found):
        raise RegUsageError("attach() was given the same optimizer twice")
    return list(found)


def check_model(reg: Regularizer, stepped: set[int], which: str = "the optimizer") -> None:
    """An optimizer that steps none of the model's tensors: its steps would count in ``reg.step`` and
    move the schedules, for another model."""
    if not stepped & {id(e.param) for e in reg.table.entries}:
        raise RegUsageError(
            f"{which} steps none of the parameters of the model the rules were compiled for: build it "
            "from reg.param_groups()"
        )


def check_after_step(reg: Regularizer, optimizer: torch.optim.Optimizer) -> None:
    """What ``after_step(optimizer)`` needs of the optimizer, checked before it changes anything: the
    model's tensors, every proximal parameter's group, and each scheduled decay's group."""
    check_model(reg, {id(p) for g in optimizer.param_groups for p in g["params"]})
    if reg._post.prox:
        reg._post.locate(optimizer.param_groups)
    reg._decay.groups(optimizer)


def unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), which has no step hooks of its own: its ``step()`` runs the inner one's."""
    for _ in range(8):  # wrappers of wrappers, not a cycle
        inner = getattr(optimizer, "optimizer", None)
        if has_step_hooks(optimizer) or inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def has_step_hooks(optimizer: Any) -> bool:
    return "_optimizer_step_pre_hooks" in getattr(optimizer, "__dict__", {})


def check_split(reg: Regularizer, stepped: Sequence[set[int]]) -> None:
    """Several optimizers: no trainable parameter in two, none that a term acts on in none."""
    entries = [e for e in reg.table.entries if e.trainable]
    shared = [e.name for e in entries if sum(id(e.param) in ids for ids in stepped) > 1]
    if shared:
        raise RegUsageError(
            f"{name_list(shared)} {'are' if len(shared) > 1 else 'is'} in more than one of the {len(stepped)} optimizers: "
            "with several, each parameter is stepped by one; build each from reg.param_groups(of=...) of its own part"
        )
    acted_on = {id(i.param) for i in live(reg._loss_items) + live(reg._post_items)}
    acted_on.update(id(e.param) for key, members in reg._groups if key.decay is not None for e in members)
    owned = set().union(*stepped)
    orphans = [e.name for e in entries if id(e.param) in acted_on and id(e.param) not in owned]
    if orphans:
        raise RegUsageError(
            f"the rules regularize {name_list(orphans)}, which none of the {len(stepped)} optimizers steps: "
            "put every regularized parameter in one of them, or exclude it in the rule file"
        )


def warn_other_folds(reg: Regularizer, optimizer: torch.optim.Optimizer) -> None:
    """Warn when another regularizer attached to ``optimizer`` folds a term kind on a tensor that these
    rules give a term of the same kind (the same file compiled twice, both attached): each adds its
    own to the gradient, silently twice the strength."""
    from .fold import FoldPlan  # the hooks' arguments: imported here, where the fold is already loaded

    mine = {(id(i.param), i.kind) for i in reg._loss_items}
    names = dict(zip(map(id, reg.table.params), reg.table.names))
    twice: dict[str, list[str]] = {}
    for hook in optimizer._optimizer_step_pre_hooks.values():
        plan = next((a for a in getattr(hook, "args", ()) if isinstance(a, FoldPlan)), None)
        if plan is None or plan.retired:  # not this regularizer's: its hooks come after this check
            continue
        for item in plan.items:
            if (id(item.param), item.kind) in mine:
                twice.setdefault(item.kind, []).append(names[id(item.param)])
    if twice:
        what = "; ".join(f"{kind} on {name_list(sorted(set(found)))}" for kind, found in twice.items())
        warnings.warn(
            RegDslWarning(
                f"another regularizer attached to this optimizer folds the same terms ({what}): with this one too, "
                "each applies its own and the strength counts twice (the same rules compiled twice?). "
                "Detach the other one first (other.detach()), or keep these terms in one rule file"
            ),
            stacklevel=caller_stacklevel(),
        )
