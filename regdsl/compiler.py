"""Spec + model -> the :class:`Regularizer`: optimizer parameter groups, a loss penalty, post-step terms.

What each parameter gets is decided by :mod:`regdsl.resolution`; whether the file
may be applied at all by :mod:`regdsl.diagnose` (the same diagnostics
``regdsl check`` prints, so a rule that matches nothing is an error here too).
Per-step work is left to :mod:`regdsl.penalties` (the loss), :mod:`regdsl.activity`
(module outputs), :mod:`regdsl.constraints` (after each optimizer step) and to the
optimizer itself (``decay``, ``lr_mult``). The :class:`Regularizer` owns the step
counter that drives every schedule.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import state as resume
from .activity import ActivityPlan
from .attach import Attachment, DecayWriter, cut_groups, optimizer_groups, subset
from .build import load
from .constraints import PostStepPlan
from .ddp import DeferredPenalty, ddp_of, defers
from .diagnose import diagnose, enforce
from .errors import RegUsageError
from .gcpause import paused_gc
from .guards import (
    PenaltyWatch,
    check_group_arguments,
    check_parameters_current,
    outside_inference_mode,
    warn_not_listening,
    warn_untaken,
)
from .items import step_items
from .optimizer_checks import check_after_step, optimizer_list
from .penalties import PenaltyPlan
from .resolution import Coverage, GroupSummary, ModuleRow, ParamRow, Resolution, Setting, resolve
from .schedule import any_scheduled, is_scheduled, strength_at
from .spaces import require_values, suggest
from .spec import Spec
from .step_hooks import release, remove_all

__all__ = ["Coverage", "GroupSummary", "ModuleRow", "ParamRow", "Regularizer", "Resolution", "Setting", "compile", "resolve"]


class Regularizer:
    """A spec resolved against one model.

    ``param_groups()`` feeds the optimizer, ``penalty()`` the loss, ``attach()``
    (or ``after_step()``) runs what happens after each optimizer step, and
    ``explain()`` says what every parameter got and from which line. Terms that
    cannot work on their parameter raise :class:`RegCompileError` here, before
    anything is half-applied.
    """

    @outside_inference_mode
    def __init__(
        self, spec: Spec, model: nn.Module, reference: Mapping[str, torch.Tensor] | None = None, accumulation_steps: int = 1
    ):
        if not isinstance(spec, Spec) or not isinstance(model, nn.Module):  # regdsl.compile() says the same
            raise TypeError(
                f"Regularizer(spec, model) takes a Spec and a torch.nn.Module, not {type(spec).__name__} and "
                f"{type(model).__name__}: regdsl.compile(path_or_spec, model) builds one"
            )
        require_values(spec)  # a search space has no value to compile with (regdsl.spaces)
        self.accumulation_steps = accumulation_steps
        self._ddp = ddp_of(model)  # under find_unused_parameters, penalty() defers its gradients (regdsl.ddp)
        self._deferred: DeferredPenalty | None = None
        with paused_gc():  # one collection of what resolving, checking and building made, not one per stage
            self._build(spec, model, reference)

    @property
    def accumulation_steps(self) -> int:
        """Backward passes per optimizer step: ``penalty()`` is divided by it (docs/distributed.md)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RegUsageError(f"accumulation_steps must be a whole number >= 1, got {k!r}")
        self._accumulation_steps = k

    def _build(self, spec: Spec, model: nn.Module, reference: Mapping[str, torch.Tensor] | None) -> None:
        self.spec = spec
        self.resolution = resolve(spec, model)
        # Errors raise before anything is built; warnings are RegDslWarnings at the caller's compile().
        enforce(diagnose(self.resolution, reference))
        self.table = self.resolution.table
        self._rows = self.resolution.rows
        self._groups = self.resolution.groups()
        self._step = 0
        self._lr_scale: bool | None = None  # how param_groups() last built groups: remap_optimizer_state builds so
        self._scheduled_decays = [(k, m) for k, m in self._groups if k.decay is not None and is_scheduled(k.decay)]
        self._decay = DecayWriter(self._scheduled_decays)  # after_step()'s optimizer: it holds every member
        self._attached: Attachment | None = None  # set by attach(): the optimizers, their folds and post-step terms
        self._hooks: list[Any] = []
        self._hook_finalizer = weakref.finalize(self, release, self._hooks)
        loss, post, self._references, targets = step_items(self.resolution, reference)
        self._loss_items = loss
        self._penalty = PenaltyPlan(loss)
        self._post_items = post
        self._post = PostStepPlan(post)
        self._activity = ActivityPlan(targets)
        self._warned_untaken = False
        self._watch = PenaltyWatch(self._penalty.items)  # warns when steps run without the penalty() it holds
        self._first_trainable = next((e.param for e in self.table.entries if e.trainable), None)
        # Whether a step needs more than the counter: post-step terms, pending activity values, schedules.
        self._busy = bool(self._post or self._activity or self._scheduled_decays) or any_scheduled(i.term for i in loss)

    # ------------------------------------------------------------ optimizer

    def param_groups(
        self, of: nn.Module | Iterable[torch.Tensor] | None = None, *, lr_scale: bool = False, **defaults: Any
    ) -> list[dict[str, Any]]:
        """Parameter groups for any ``torch.optim`` optimizer; each trainable tensor appears once.

        ``of`` (a submodule, or parameters) keeps only its trainable tensors: the groups of the
        full call, each cut down to them, settings and names unchanged, the empty ones left out.
        One optimizer per part of the model (a GAN's generator and discriminator) is built this way.
        Keyword arguments (``lr=...``, ``betas=...``) are copied into every group. A group
        with ``lr_mult m`` gets ``lr = m · lr``: torch's LR schedulers scale each group's own
        lr, so the ratio holds through any of them. With ``lr_scale=True`` such a group gets
        ``lr_scale = m`` instead and keeps the base lr: timm's schedulers overwrite every
        group's lr and multiply it by its ``lr_scale``. Never both.
        """
        check_group_arguments(of, lr_scale, defaults)
        check_parameters_current(self.table)  # an optimizer built from replaced tensors would train none of the model's
        given = subset(of, self.table.entries) if of is not None else None
        chosen = self._groups if given is None else cut_groups(self._groups, given)
        if given is not None and not chosen:
            raise RegUsageError(
                "param_groups(of=...) holds no parameter the rules train: "
                + ("every one given is frozen" if given else "it was given none (an empty list, or a module without parameters)")
            )
        if not lr_scale and "lr" not in defaults and any(key.lr_mult not in (None, 1.0) for key, _ in chosen):
            raise RegUsageError(
                "the rule file scales learning rates (lr_mult, lr_decay), so param_groups() needs the base learning rate: param_groups(lr=...) "
                "(or param_groups(lr_scale=True) for timm's schedulers)"
            )
        self._lr_scale = lr_scale
        return optimizer_groups(chosen, self._step, lr_scale, defaults)

    @outside_inference_mode
    def attach(
        self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], fold: bool = False, fold_hook: bool = True
    ) -> Regularizer:
        """Run :meth:`after_step` automatically after every ``optimizer.step()`` (torch's step hooks).

        With ``fold=True`` the gradients of ``l1``, ``l2``, ``l2 ... to``, ``group_lasso`` and
        ``orthogonal`` on the optimizer's parameters are added to ``p.grad`` right before each
        update (docs/fold.md), and :meth:`penalty` leaves them out. With nothing scheduled and
        nothing to do after a step, the only hook counts steps (or the fold's hook does).
        Needs an optimizer built from :meth:`param_groups` when a ``decay`` has a schedule.

        A list of optimizers that split the model (each built from ``param_groups(of=part)``):
        each one's step folds and post-processes its own parameters, and every step of any of
        them counts one in :attr:`step` (:mod:`regdsl.attach`).

        ``fold_hook=False`` is for steps whose backward runs inside ``optimizer.step(closure)``
        (Lightning), after any pre-hook: the caller adds the terms with :meth:`fold` once the
        gradients are there.
        """
        if self._attached is not None:
            if self._attached.holds():  # else every optimizer it was attached to is gone: attach anew
                raise RegUsageError("this regularizer is already attached to an optimizer; detach() first")
            self.detach()
        optimizers = optimizer_list(optimizer)
        check_parameters_current(self.table)
        self._attached = Attachment(self, optimizers, fold, fold_hook)  # raises before anything is installed
        self._hooks += self._attached.hooks
        rest = self._attached.rest  # None without fold: penalty() holds every loss term
        self._watch.watch(rest.items if rest is not None else self._penalty.items, rest is not None)
        self._activity.register()  # after a detach(), the forward hooks come back too
        return self

    def fold(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add the folded terms' gradients to ``p.grad`` now, for ``attach(opt, fold=True, fold_hook=False)``:
        once per optimizer step, after the last backward and before the update. With several
        optimizers attached, pass the one about to step: only its parameters' terms are added."""
        if self._attached is None:
            raise RegUsageError("fold() needs attach(optimizer, fold=True, fold_hook=False) first")
        self._attached.fold(optimizer)

    def compiled_step(self, optimizer: torch.optim.Optimizer | None = None, **options: Any) -> Callable[..., Any]:
        """``optimizer.step`` compiled with the folded terms inside the update's own graph, for
        ``opt.step = reg.compiled_step(opt)`` after ``attach(opt, fold=True)``; ``options`` go to
        ``torch.compile``. With several optimizers attached, name the one (docs/fold.md)."""
        if self._attached is None:
            raise RegUsageError("compiled_step() needs attach(optimizer, fold=True) first")
        return self._attached.compiled_step(optimizer, options, self)

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call right after ``optimizer.step()`` when not attached: proximal steps and constraints
        with this step's strengths, then the step counter advances and every scheduled strength
        (and scheduled ``decay``, written into ``optimizer``'s groups) moves to the next step."""
        if self._attached is not None:
            raise RegUsageError("after_step() on an attached regularizer would count each step twice")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise RegUsageError(f"after_step() takes the optimizer that just stepped, not a {type(optimizer).__name__}")
        if optimizer is None and (self._post.prox or self._scheduled_decays):
            raise RegUsageError(
                "after_step() needs the optimizer: "
                + ("'l1 ... prox' reads each group's learning rate" if self._post.prox else "a scheduled decay is written into its groups")
            )
        if optimizer is not None:
            check_after_step(self, optimizer)  # before anything moves: a refused call changes nothing
        self._activity.register()  # after a detach(), activity terms collect again from the next forward
        self._advance(optimizer)

    def _advance(self, optimizer: torch.optim.Optimizer | None) -> None:
        # Activity values no penalty() took belong to a step that is over; keeping them would hold graphs.
        owner = self._attached.owner(optimizer) if self._attached is not None else None
        if self._activity.drop(owner.activity if owner is not None else None) and not self._warned_untaken:
            self._warned_untaken = True
            warn_untaken(self._activity.targets)
        if self._watch.active:
            self._watch.stepped(id(optimizer) if optimizer is not None else 0, optimizer)
        post = owner.post if owner is not None else self._post
        # A fused step under GradScaler runs (and counts) when it found an inf, its kernel updating nothing:
        # prox and max_norm leave the weights alone too (read with a host sync, only where they exist).
        found_inf = getattr(optimizer, "found_inf", None)
        if not (post and isinstance(found_inf, torch.Tensor) and bool(found_inf)):
            post.apply(self._step, optimizer.param_groups if optimizer is not None else None)
        self._set_step(self._step + 1, optimizer)

    def _set_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Every strength to ``step``; scheduled decays into the attached optimizers, or into ``optimizer``."""
        self._step = step
        self._penalty.set_step(step)
        if self._deferred is not None:
            self._deferred.set_step(step)
        self._activity.set_step(step)
        if self._attached is not None:
            self._attached.set_step(step)
        elif optimizer is not None:
            self._decay.write(optimizer, step)

    def detach(self) -> None:
        """Remove the optimizer hooks (the fold's too: penalty() is whole again) and the activity forward hooks."""
        remove_all(self._hooks)
        if self._attached is not None:
            self._attached.retire()
        self._attached = None
        self._watch.watch(self._penalty.items)
        self._activity.remove()

    @property
    def step(self) -> int:
        """Optimizer steps counted so far: the ``t`` of every schedule."""
        return self._step

    def strength(self, name: str, kind: str) -> float:
        """The effective strength of ``kind`` on parameter (or module) ``name`` at the current step; 0 if unset."""
        setting = self.resolution.setting(name, kind)
        if setting is None:
            return 0.0
        return strength_at(setting.term, self._step) if hasattr(setting.term, "strength") else setting.value

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The step counter, every ``w0`` of ``l2 ... to init|ref`` keyed by parameter name, and the
        optimizer group layout (``groups``: name, settings, member names) that resuming checks."""
        return {
            "step": self._step,
            "references": {name: item.reference for name, item in self._references.items()},
            "reference_kinds": {name: item.term.to for name, item in self._references.items()},
            "groups": resume.layout(self.groups_summary()),
        }

    @outside_inference_mode
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`: schedules continue from the saved step, references are the saved ones.

        With ``strict``, a state saved with another group layout, or without a reference of the
        current rules (one added since, or saved for the other of ``to init``/``to ref``), raises
        :class:`RegStateError` (resume through :meth:`remap_optimizer_state`, then load with
        ``strict=False``: such a reference keeps the ``w0`` compile made, with a warning), and one
        saved before layouts were recorded loads with a :class:`RegDslWarning`. Nothing changes when it raises."""
        step = resume.saved_step(state)
        if strict:
            resume.check_layout(state, resume.layout(self.groups_summary()))
        items = {name: (item.param, item.term.to) for name, item in self._references.items()}
        for name, saved in resume.saved_references(state, items, strict).items():
            item = self._references[name]
            item.reference, item.ref = saved.detach().to(device=item.param.device, copy=True), None
            item.follow()
        self._set_step(step, None)

    def remap_optimizer_state(
        self, optimizer_state: Mapping[str, Any], state: Mapping[str, Any], of: nn.Module | Iterable[torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """The optimizer state dict saved beside ``state`` (a :meth:`state_dict`), for these rules' groups.

        Pass it to ``optimizer.load_state_dict`` of an optimizer built from :meth:`param_groups`
        (``of``: one built from ``param_groups(of)``, both layouts cut down to that part).
        Per-parameter state follows each parameter by name; ``weight_decay`` (at the saved step),
        ``name`` and ``lr_mult`` (``lr_scale`` too, where :meth:`param_groups` wrote it) come from the
        rules, the rest of a group (``lr``, ``betas``, ``initial_lr``...) from the saved group it
        continues. See :mod:`regdsl.state`.
        """
        step = resume.saved_step(state)
        decays = [strength_at(key.decay, step) if key.decay else 0.0 for key, _ in self._groups]
        current = resume.layout(self.groups_summary())
        if of is not None:
            ids = subset(of, self.table.entries)
            state, current, decays = resume.of_part(state, current, decays, {e.name for e in self.table.entries if id(e.param) in ids})
        return resume.remap_optimizer_state(optimizer_state, state, current, decays, self._lr_scale)

    # ------------------------------------------------------------ loss and reports

    @outside_inference_mode
    def penalty(self) -> torch.Tensor:
        """Every loss term (``l1``, ``l2``, ``group_lasso``, ``orthogonal``, and the activity terms
        collected since the last call) as a differentiable 0-dim tensor, divided by
        :attr:`accumulation_steps`."""
        # Read at each call: model.to() after compiling moves the parameters, and the zero must follow.
        device = self._first_trainable.device if self._first_trainable is not None else None
        self._watch.taken = True
        total = self._loss_plan()(device)
        if not self._activity.listening:
            warn_not_listening(self._activity.targets)
        for value in self._activity.take():
            # float64 activations keep their precision, as float64 parameters do.
            dtype = torch.promote_types(total.dtype, value.dtype)
            total = total.to(dtype) + value.to(device=total.device, dtype=dtype)
        return total if self._accumulation_steps == 1 else total / self._accumulation_steps

    def _loss_plan(self) -> PenaltyPlan | DeferredPenalty:
        rest = self._attached.rest if self._attached is not None else None
        plan = rest if rest is not None else self._penalty
        if not plan or not defers(self._ddp):
            return plan
        if self._deferred is None or self._deferred.source is not plan:
            self._deferred = DeferredPenalty(plan)
        return self._deferred

    @outside_inference_mode
    def values(self) -> dict[str, torch.Tensor]:
        """Each loss term's value now, ``{"l1:6": tensor, ...}`` by term kind and rule line, folded
        terms included; computed on demand without a host sync (see :mod:`regdsl.values`)."""
        from .values import term_values

        return term_values(self)

    def explain(self) -> list[ParamRow]:
        """One row per parameter tensor (frozen ones too), in registration order."""
        return list(self._rows)

    def explain_modules(self) -> list[ModuleRow]:
        """One row per module with an activity term."""
        return list(self.resolution.modules)

    def groups_summary(self) -> list[GroupSummary]:
        """Each optimizer group: name, weight_decay, member names, element count, lr_mult."""
        return self.resolution.groups_summary()

    def coverage(self) -> Coverage:
        return self.resolution.coverage()

    def __repr__(self) -> str:
        trainable = sum(self.table.trainable)
        return (
            f"<Regularizer {len(self.spec.statements)} statements, {trainable} trainable tensors, "
            f"{len(self._groups)} groups, step {self._step}>"
        )


def compile(
    rules: Spec | str | os.PathLike[str],
    model: nn.Module,
    reference: Mapping[str, torch.Tensor] | None = None,
    accumulation_steps: int = 1,
    trial: Any = None,
) -> Regularizer:
    """Compile a spec, or the ``.reg`` file at a path, against ``model``.

    ``reference`` (a state_dict) supplies ``w0`` for ``l2 ... to ref``. With gradient
    accumulation, ``accumulation_steps=k`` makes ``penalty()`` return ``1/k`` of the terms,
    so that adding it to each micro-batch's loss applies them once per optimizer step.
    ``trial`` (an Optuna trial) gives each search space of the rules its value, through
    ``trial.suggest_float``/``suggest_categorical`` under the space's name.
    """
    if not isinstance(rules, (Spec, str, os.PathLike)):
        raise TypeError(f"regdsl.compile takes a .reg file's path or a Spec (regdsl.parse(text)), not {type(rules).__name__}")
    try:
        spec = rules if isinstance(rules, Spec) else load(rules)
    except FileNotFoundError as error:  # rule text passed for a path reads as a missing file
        hint = "regdsl.compile takes a .reg file's path or a Spec; rule text goes through regdsl.parse(text).compile(model)"
        raise FileNotFoundError(error.errno, f"{error.strerror} ({hint})", error.filename) from None
    if trial is not None:
        spec = spec.with_values(suggest(spec, trial))
    return spec.compile(model, reference=reference, accumulation_steps=accumulation_steps)

