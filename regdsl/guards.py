"""What the runtime refuses or warns about in a training loop, so that no rule silently does
nothing: parameters replaced since compile(), activity terms no loss received or no hook collects,
and AdamW decay too small to move 16-bit weights (:mod:`regdsl.precision`)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, TypeVar

import torch

from .errors import RegDslWarning, RegUsageError, caller_stacklevel, name_list
from .precision import decay_underflows
from .schedule import is_scheduled, peak, strength_at
from .walk import canonical_name

F = TypeVar("F", bound=Callable[..., Any])


def outside_inference_mode(method: F) -> F:
    """``method`` run outside ``torch.inference_mode()`` when called inside it, gradients off as they
    were: a validation step (Lightning's ``trainer.validate`` and ``test`` run in inference mode) that
    reads ``reg.penalty()`` or ``reg.values()`` may build what training steps use later (buckets
    rebuilt after ``model.to(...)``, a moved reference, the kept zero), and a tensor made in inference
    mode can neither be saved for backward nor have its version read. What it returns is then an
    ordinary tensor without gradient."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        # Traced (penalty() inside a compiled loss), the mode is not read: dynamo breaks the graph on it.
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return method(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return run  # type: ignore[return-value]


def check_parameters_current(table: Any) -> None:
    """Refuse to run when the model's parameters are no longer those compile() read: a trainable one
    replaced (``fully_shard``, ``load_state_dict(assign=True)``, a new ``nn.Parameter``, a new layer in
    an old one's place), whose terms would act on a tensor nothing trains, or a trainable one added,
    or one frozen at compile and trainable now, which no rule reaches and no group holds. Every module
    is read again, at each ``attach`` and ``param_groups()``."""
    now: dict[int, torch.Tensor] = {}
    for module in table.root.modules():
        for p in module._parameters.values():
            if p is not None:
                now[id(p)] = p
    gone = [name for p, name, on in zip(table.params, table.names, table.trainable) if on and id(p) not in now]
    if gone:
        raise RegUsageError(
            f"the model's parameter{'s' if len(gone) > 1 else ''} {name_list(gone)} {'are' if len(gone) > 1 else 'is'} not the "
            f"tensor{'s' if len(gone) > 1 else ''} compile() saw: replaced since (fully_shard, "
            "load_state_dict(assign=True), assigning a new nn.Parameter or module); compile again after "
            "replacing parameters, then build the optimizer from the new reg.param_groups()"
        )
    unfrozen = [name for p, name, on in zip(table.params, table.names, table.trainable) if not on and p.requires_grad]
    if unfrozen:
        many = len(unfrozen) > 1
        raise RegUsageError(
            f"the model's parameter{'s' * many} {name_list(unfrozen)} {'were' if many else 'was'} frozen when "
            f"compile() read the model and {'are' if many else 'is'} trainable now: no rule reaches "
            f"{'them' if many else 'it'} and no group holds {'them' if many else 'it'}. Compile again after "
            "unfreezing, then build the optimizer from the new reg.param_groups()"
        )
    known = set(map(id, table.params))
    if any(id_ not in known and p.requires_grad for id_, p in now.items()):
        added = [
            canonical_name(name)
            for name, p in table.root.named_parameters()
            if id(p) not in known and p.requires_grad
        ]
        raise RegUsageError(
            f"the model has trainable parameter{'s' if len(added) > 1 else ''} {name_list(added)} that compile() "
            "did not see: no rule reaches them. Compile again after adding parameters, then build the "
            "optimizer from the new reg.param_groups()"
        )


class LrRatios:
    """The ratios ``lr_mult`` (and ``lr_decay``) set between an optimizer's groups, checked after its
    steps 1, 2, 4, 8, ...: a scheduler that sets every group's lr from one value (``OneCycleLR``,
    ``CyclicLR`` given one ``max_lr``, ``base_lr``) drops them, silently. Warns once. Each group's lr
    over its multiplier (``lr_scale`` for timm's schedulers, else ``lr_mult``, else 1) must be one
    base lr. Only the groups ``param_groups()`` made are read (``names``; not one added since with an
    lr of its own), and not an lr of 0, a tensor lr (compiled steps) or a multiplier of 0."""

    def __init__(self, names: set[str]) -> None:
        self._names = names
        self._steps = 0
        self._warned = False

    @staticmethod
    def needed(groups: Sequence[dict[str, Any]], names: set[str]) -> bool:
        return any(_multiplier(g) != 1.0 for g in groups if g.get("name") in names)

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        self._steps += 1
        if self._warned or self._steps & (self._steps - 1):
            return
        bases = [
            (g["lr"] / m, g)
            for g in optimizer.param_groups
            if g.get("name") in self._names and isinstance(g["lr"], float) and g["lr"] and (m := _multiplier(g))
        ]
        if not bases:
            return
        (low, a), (high, b) = min(bases, key=lambda x: x[0]), max(bases, key=lambda x: x[0])
        if high <= low * (1 + 1e-6):
            return
        self._warned = True
        why = (
            # param_groups(lr_scale=True), timm's param_group_fn(lr_scale=True): the ratio is in lr_scale only.
            "These groups carry it as lr_scale, which only timm's schedulers apply (each step they set lr to "
            "the scheduled value times lr_scale): step a timm scheduler from the first step, or build the groups "
            "with lr=... instead of lr_scale=True for torch's schedulers or none"
            if "lr_scale" in a or "lr_scale" in b
            else "A scheduler that sets every group's lr from one value drops lr_mult: give OneCycleLR or CyclicLR "
            "one value per group (max_lr=[g['lr'] for g in optimizer.param_groups])"
        )
        warnings.warn(
            RegDslWarning(
                f"the optimizer's groups no longer have the learning rates lr_mult (or lr_decay) sets: group "
                f"'{a.get('name', '?')}' has lr {a['lr']:.6g}, group '{b.get('name', '?')}' {b['lr']:.6g}, where the "
                f"rules make their ratio {_multiplier(b) / _multiplier(a):.6g}. {why}"
            ),
            stacklevel=caller_stacklevel(through_torch=True),
        )


def check_lrs(ratios: LrRatios, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The step post-hook of :class:`LrRatios`."""
    ratios.stepped(optimizer)


def _multiplier(group: dict[str, Any]) -> float:
    return group.get("lr_scale", group.get("lr_mult", 1.0))


def warn_decay_underflow(optimizer: torch.optim.Optimizer, groups: Sequence[tuple[Any, Any]]) -> None:
    lines = {key.name: key.decay.pos.line for key, _ in groups if key.decay is not None and key.decay.pos is not None}
    # A scheduled decay is read at its peak: at attach its group holds the step's value (0 in a warmup).
    peaks = {key.name: peak(key.decay) for key, _ in groups if key.decay is not None and is_scheduled(key.decay)}
    for message in decay_underflows(optimizer, lines, peaks):
        warnings.warn(RegDslWarning(message), stacklevel=caller_stacklevel())


def warn_decay_not_in_groups(optimizer: torch.optim.Optimizer, groups: Sequence[tuple[Any, Any]], step: int) -> None:
    """A file with ``decay`` rules, attached to an optimizer whose groups decay the tensors otherwise
    (built from ``model.parameters()``: torch's AdamW decays every tensor by 0.01, biases and norms
    the file excludes too, and no tensor by the file's value). The file's decay would be a silent no-op."""
    if not any(key.decay is not None for key, _ in groups):
        return
    wanted = {
        id(e.param): (e.name, strength_at(key.decay, step) if key.decay is not None else 0.0)
        for key, members in groups
        for e in members
    }
    wrong = []
    for group in optimizer.param_groups:
        actual = group.get("weight_decay", 0.0)
        actual = float(actual.item()) if isinstance(actual, torch.Tensor) else float(actual)
        for p in group["params"]:
            name, value = wanted.get(id(p), (None, actual))
            if name is not None and not math.isclose(actual, value, rel_tol=1e-9, abs_tol=1e-12):
                wrong.append(f"'{name}': {actual:g} where the rules give {value:g}")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        warnings.warn(
            RegDslWarning(
                f"the optimizer's weight_decay is not the rule file's for {len(wrong)} tensor{'s' * (len(wrong) > 1)} "
                f"({shown}): the file's decay acts through the optimizer's groups, so build it from reg.param_groups()"
            ),
            stacklevel=caller_stacklevel(),
        )


def check_maximize(optimizers: Sequence[torch.optim.Optimizer], fold: bool) -> None:
    """An optimizer with ``maximize=True`` climbs its gradient: a term folded into it, or a penalty
    added to the objective it maximizes, would grow (decay, prox and max_norm still shrink). The fold
    cannot be told apart from the data gradient, so it is refused; the loss path is told to subtract."""
    if not any(group.get("maximize", False) for optimizer in optimizers for group in optimizer.param_groups):
        return
    if fold:
        raise RegUsageError(
            "attach(fold=True) with an optimizer that has maximize=True: it would climb the folded terms, growing the "
            "weights they shrink; attach(optimizer) and subtract the penalty from the objective it maximizes"
        )
    warnings.warn(
        RegDslWarning(
            "the optimizer has maximize=True: subtract reg.penalty() from the objective it maximizes "
            "(objective - reg.penalty()); added, the terms would grow the weights they shrink"
        ),
        stacklevel=caller_stacklevel(),
    )


def warn_untaken(targets: Sequence[Any]) -> None:
    """An optimizer step ran (inside torch's step hook) with activity values no penalty() took."""
    warnings.warn(
        RegDslWarning(
            f"an optimizer step ran while activity terms{_lines(targets)} collected in the forward pass were never "
            "added to a loss: add reg.penalty() to the loss of each training step, or they do nothing"
        ),
        stacklevel=caller_stacklevel(through_torch=True),
    )


def warn_not_listening(targets: Sequence[Any]) -> None:
    warnings.warn(
        RegDslWarning(
            f"penalty() holds no activity terms{_lines(targets)}: detach() removed their forward hooks; attach() "
            "again, or call after_step() after each optimizer step, and they collect from the next forward pass"
        ),
        stacklevel=caller_stacklevel(),
    )


def _lines(targets: Sequence[Any]) -> str:
    lines = sorted({t.term.pos.line for t in targets if t.term.pos is not None})
    return f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})" if lines else ""


class PenaltyWatch:
    """Whether a ``penalty()`` call came before each optimizer step while ``penalty()`` holds loss
    terms nothing else applies (not folded): without one they do nothing, silently. Warns once per
    regularizer. With nothing held (constant ``decay`` alone, everything folded) the step hooks
    skip the check.

    ``penalty()`` only sets :attr:`taken`, and never reads it: under ``torch.compile`` a value
    the traced function read would be a guard, and a counter would recompile it at every call.
    A step that finds it set opens a new epoch; each optimizer remembers the epoch of its last
    step, so one ``penalty()`` before two optimizers step serves both."""

    def __init__(self, items: Sequence[Any]):
        self.taken = False
        self._epoch = 0
        self._warned = False
        self.watch(items)

    def watch(self, items: Sequence[Any], folding: bool = False) -> None:
        """From now on, the terms ``penalty()`` holds are ``items``; steps so far are forgotten."""
        self.items, self.folding = list(items), folding
        self.active = bool(self.items)
        self._last: dict[int, int] = {}
        self._start = self._epoch

    def stepped(self, key: int, optimizer: Any = None) -> None:
        """An optimizer step (``key``: its id; 0 for ``after_step()``) is over, or about to update."""
        if self.taken:
            self.taken = False
            self._epoch += 1
        if self._last.get(key, self._start) == self._epoch and not self._warned:
            if optimizer is not None and without_gradients(optimizer):
                return  # no backward before it (a skipped training_step): a penalty() would have done nothing
            self._warned = True
            held = "loss terms that cannot fold" if self.folding else "loss terms"
            hint = "" if self.folding else " (or attach(optimizer, fold=True) folds those that can into the step itself)"
            warnings.warn(
                RegDslWarning(
                    f"an optimizer step ran with no reg.penalty() call since the step before, while penalty() holds "
                    f"{held}{_lines(self.items)}: they do nothing unless reg.penalty() is added to the loss of each "
                    f"training step{hint}"
                ),
                stacklevel=caller_stacklevel(through_torch=True),
            )
        self._last[key] = self._epoch


def without_gradients(optimizer: Any) -> bool:
    """Whether no tensor ``optimizer`` steps has a gradient: no backward came before its step (a
    skipped batch), so torch updates nothing, and a missing ``penalty()`` or ``reg.fold()`` is no loss."""
    return all(p.grad is None for group in optimizer.param_groups for p in group["params"])


def check_group_arguments(of: Any, lr_scale: Any, defaults: dict[str, Any]) -> None:
    """``param_groups(of, lr_scale=..., **defaults)``'s arguments, before anything is built."""
    for key in ("params", "weight_decay", "name"):
        if key in defaults:
            raise RegUsageError(
                f"param_groups() does not take {key!r}: the rule file sets it"
                + (" (write 'all decay VALUE' for a default decay)" if key == "weight_decay" else "")
                + (" (param_groups(of=...) builds the groups of a part of the model)" if key == "params" else "")
            )
    if isinstance(of, bool):
        raise RegUsageError("param_groups()'s first argument is a module or parameters: write param_groups(lr_scale=True)")
    if not isinstance(lr_scale, bool):  # "no" is truthy: the lr_mult groups would silently lose their ratio
        raise RegUsageError(f"param_groups(lr_scale=...) takes True or False, not {lr_scale!r}")
    check_base_lr(defaults)


def check_base_lr(defaults: dict[str, Any]) -> None:
    """``param_groups(lr=...)``: a number (or a tensor, which torch's optimizers take), which an
    ``lr_mult`` multiplies; anything else failed inside the product, or (True) passed as a rate."""
    lr = defaults.get("lr", 0.0)
    if isinstance(lr, bool) or not isinstance(lr, (Real, torch.Tensor)):
        raise RegUsageError(f"param_groups(lr=...) takes a number, not {lr!r}")
