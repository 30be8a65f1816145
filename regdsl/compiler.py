"""Spec + model -> optimizer parameter groups and a loss penalty.

Resolution happens once, here: for every parameter tensor and every term kind,
the last rule in file order that matches the tensor and sets that kind wins;
``none`` clears all regularization kinds at its position; any ``exclude`` that
matches the tensor removes every regularization term, wherever it stands
(``lr_mult`` is an optimizer setting, which neither touches). Activity terms
resolve the same way over modules instead of parameters.

Per-step work is left to :mod:`regdsl.penalties` (the loss), :mod:`regdsl.activity`
(module outputs), :mod:`regdsl.constraints` (after each optimizer step) and to the
optimizer itself (``decay``, ``lr_mult``). The :class:`Regularizer` owns the step
counter that drives every schedule.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activity import ActivityPlan, ActivityTarget
from .build import load
from .codes import severity
from .constraints import PostStepItem, PostStepPlan
from .errors import Diagnostic, RegCompileError, RegUsageError, source_line_at
from .penalties import LossItem, PenaltyPlan
from .printer import format_schedule
from .report import module_label
from .schedule import always_zero, is_scheduled, strength_at
from .select import ParamEntry, ParamTable, canonical_name, is_embedding_module, module_matches
from .spec import (
    MODULE_TERMS,
    NOT_REGULARIZERS,
    PARAM_TERMS,
    DecayTerm,
    Exclude,
    NoneTerm,
    Rule,
    Span,
    Spec,
    kind_label,
)


@dataclass(frozen=True)
class Setting:
    """A term on one parameter (or module), and the rule that set it."""

    value: float
    origin: str | None
    pos: Span | None
    term: Any = None  # the spec's term node; None for an exclude or a 'none'

    @property
    def where(self) -> str:
        """``file:line`` of the rule that set it."""
        line = self.pos.line if self.pos else "?"
        return f"{self.origin or '<string>'}:{line}"


@dataclass(frozen=True)
class ParamRow:
    """What the rule file does to one parameter tensor."""

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...] | None  # None for an uninitialized lazy parameter
    numel: int
    trainable: bool
    excluded_by: Setting | None  # the first exclude that matched, if any
    cleared_by: Setting | None  # the last 'none' that cleared its terms, if any
    terms: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleRow:
    """What the rule file does to one module's output (activity terms)."""

    name: str
    class_name: str
    excluded_by: Setting | None
    cleared_by: Setting | None
    terms: dict[str, Setting] = field(default_factory=dict)


@dataclass
class Count:
    tensors: int = 0
    elements: int = 0

    def add(self, numel: int) -> None:
        self.tensors += 1
        self.elements += numel


@dataclass(frozen=True)
class Coverage:
    """Tensor and element counts: per term (strength > 0), with no term, excluded, frozen."""

    terms: dict[str, Count]
    nothing: Count  # trainable, and no term with a strength above 0
    excluded: Count  # trainable, removed by an exclude (also counted in ``nothing``)
    frozen: Count


@dataclass(frozen=True)
class GroupSummary:
    name: str
    weight_decay: float  # the decay's strength; a schedule scales it from step to step
    params: tuple[str, ...]
    numel: int
    lr_mult: float = 1.0
    schedule: str = ""  # the decay's schedule as written ("warmup 100"), or ""


@dataclass(frozen=True)
class GroupKey:
    """What makes two parameters share an optimizer group."""

    decay: DecayTerm | None
    lr_mult: float | None

    @property
    def name(self) -> str:
        return group_name(self.decay.strength if self.decay else 0.0, self.decay, self.lr_mult)


@dataclass(frozen=True)
class Resolution:
    """What a spec means for one model, before anything is built for the optimizer."""

    spec: Spec
    table: ParamTable
    rows: tuple[ParamRow, ...]  # one per table entry, same order
    matches: tuple[tuple[int, ...], ...]  # per statement: entries its selector matches, frozen ones too
    modules: tuple[ModuleRow, ...] = ()  # one per module some rule gives an activity term, in registration order
    module_matches: tuple[tuple[str, ...], ...] = ()  # per statement: names of the modules it selects

    def groups(self) -> list[tuple[GroupKey, list[ParamEntry]]]:
        """Trainable entries by (decay, lr_mult), groups ordered by first member.

        Equal settings share a group: fewer groups keep torch.optim on its
        foreach/fused paths, and the order is reproducible.
        """
        groups: dict[GroupKey, list[ParamEntry]] = {}
        for entry, row in zip(self.table.entries, self.rows):
            if entry.trainable:
                decay, mult = row.terms.get("decay"), row.terms.get("lr_mult")
                term = decay.term if decay is not None and not always_zero(decay.term) else None
                # lr_mult 1 is the optimizer's own lr: the same group as no lr_mult at all.
                factor = mult.value if mult is not None and mult.value != 1.0 else None
                groups.setdefault(GroupKey(term, factor), []).append(entry)
        return list(groups.items())

    def groups_summary(self) -> list[GroupSummary]:
        return [
            GroupSummary(
                name=key.name,
                weight_decay=key.decay.strength if key.decay else 0.0,
                params=tuple(e.name for e in members),
                numel=sum(e.numel for e in members),
                lr_mult=key.lr_mult if key.lr_mult is not None else 1.0,
                schedule=format_schedule(key.decay.schedule) if key.decay else "",
            )
            for key, members in self.groups()
        ]

    def coverage(self) -> Coverage:
        """How many tensors and elements get each regularization term, nothing, or are frozen."""
        kinds = [k for k in PARAM_TERMS if k not in NOT_REGULARIZERS]
        terms = {k: Count() for k in kinds}
        nothing, frozen, excluded = Count(), Count(), Count()
        for row in self.rows:
            if not row.trainable:
                frozen.add(row.numel)
                continue
            if row.excluded_by:
                excluded.add(row.numel)
            active = [k for k, setting in row.terms.items() if k in terms and not always_zero(setting.term)]
            for kind in active:
                terms[kind].add(row.numel)
            if not active:
                nothing.add(row.numel)
        return Coverage(terms=terms, nothing=nothing, excluded=excluded, frozen=frozen)


def resolve(spec: Spec, model: nn.Module) -> Resolution:
    """Apply the cascade: per parameter (or module) and term kind, the last matching rule that
    sets it wins; ``none`` clears at its position; any matching ``exclude`` removes everything
    but ``lr_mult``."""
    table = ParamTable(model)
    params = _Cascade(len(table), spec.origin)
    modules = _Cascade(len(table.modules), spec.origin)
    # Modules are only targets of activity terms; without one, no statement needs them.
    with_activity = any(t.kind in MODULE_TERMS for s in spec.statements if isinstance(s, Rule) for t in s.terms)
    matches, module_matches_ = [], []
    for statement in spec.statements:
        matched = table.select(statement.selector)
        matches.append(tuple(e.index for e in matched))
        picked = [
            i
            for i, (name, module) in enumerate(table.modules)
            if with_activity and _selects_module(statement.selector, name, module)
        ]
        module_matches_.append(tuple(table.modules[i][0] for i in picked))
        params.apply(statement, [e.index for e in matched if e.trainable], PARAM_TERMS)
        modules.apply(statement, picked, MODULE_TERMS)
    rows = tuple(
        ParamRow(
            name=entry.name,
            aliases=entry.names[1:],
            shape=entry.shape,
            numel=entry.numel,
            trainable=entry.trainable,
            excluded_by=params.excluded[entry.index],
            cleared_by=params.cleared[entry.index],
            terms=params.result(entry.index, PARAM_TERMS),
        )
        for entry in table.entries
    )
    module_rows = tuple(
        ModuleRow(
            name=name,
            class_name=type(module).__name__,
            excluded_by=modules.excluded[i],
            cleared_by=modules.cleared[i],
            terms=modules.result(i, MODULE_TERMS),
        )
        for i, (name, module) in enumerate(table.modules)
        if modules.touched[i]
    )
    return Resolution(spec, table, rows, tuple(matches), module_rows, tuple(module_matches_))


def _selects_module(selector: Any, name: str, module: nn.Module) -> bool:
    return all(module_matches(atom, name, module) for atom in selector.atoms)


class _Cascade:
    """The per-target bookkeeping of :func:`resolve`, for parameters or for modules."""

    def __init__(self, size: int, origin: str | None):
        self.origin = origin
        self.assigned: list[dict[str, Setting]] = [{} for _ in range(size)]
        self.touched = [False] * size  # some rule set a term here (a later 'none' or exclude may remove it)
        self.excluded: list[Setting | None] = [None] * size
        self.cleared: list[Setting | None] = [None] * size

    def apply(self, statement: Any, targets: list[int], kinds: tuple[str, ...]) -> None:
        if isinstance(statement, Exclude):
            for i in targets:
                self.excluded[i] = self.excluded[i] or Setting(0.0, self.origin, statement.pos)
            return
        for term in statement.terms:
            if not isinstance(term, NoneTerm) and term.kind not in kinds:
                continue
            for i in targets:
                if isinstance(term, NoneTerm):
                    for kind in [k for k in self.assigned[i] if k not in NOT_REGULARIZERS]:
                        del self.assigned[i][kind]
                    self.cleared[i] = Setting(0.0, self.origin, term.pos)
                else:
                    self.assigned[i][term.kind] = Setting(term.value, self.origin, term.pos, term)
                    self.touched[i] = True

    def result(self, i: int, kinds: tuple[str, ...]) -> dict[str, Setting]:
        kept = self.assigned[i]
        if self.excluded[i]:
            kept = {k: v for k, v in kept.items() if k in NOT_REGULARIZERS}
        return {k: kept[k] for k in kinds if k in kept}


# Kinds that need the parameter's shape, so an uninitialized lazy parameter cannot take them.
_SHAPED = ("l1", "l2", "group_lasso", "orthogonal", "max_norm")


def _why_unusable(entry: ParamEntry, kind: str, term: Any) -> str | None:
    if any("_flat_param" in name.split(".") for name in entry.names):
        return "FSDP's flattened parameter takes no per-parameter rules; wrap with FSDP(use_orig_params=True)"
    if not entry.initialized:
        if kind in _SHAPED:
            return "a lazy module's parameters have no shape until its first forward pass; run one before compiling"
        return None
    if kind == "decay" and any(getattr(o, "sparse", False) for o in entry.owners if is_embedding_module(o)):
        return "an embedding with sparse=True gets sparse gradients, and torch optimizers cannot decay them"
    shape = tuple(entry.param.shape)
    if kind == "orthogonal" and len(shape) < 2:
        return f"it needs a weight with 2 or more dimensions, and the shape is {_shape_text(shape)}"
    if kind in ("group_lasso", "max_norm") and not -len(shape) <= term.dim < max(len(shape), 0):
        return f"dim={term.dim} is out of range for shape {_shape_text(shape)}"
    complex_ok = kind in ("decay", "l2") or (kind == "l1" and not term.prox)
    if entry.param.is_complex() and not complex_ok:
        return "complex parameters take only decay, l1 and l2 (through the loss)"
    return None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def unusable_terms(resolution: Resolution) -> list[Diagnostic]:
    """Terms the file sets that cannot work on their parameter (RD104), one diagnostic per rule and cause."""
    found: dict[tuple[Setting, str, str], list[str]] = {}
    for entry, row in zip(resolution.table.entries, resolution.rows):
        for kind, setting in row.terms.items():
            if kind in NOT_REGULARIZERS or always_zero(setting.term):
                continue  # a zero term does nothing, so it cannot fail either
            reason = _why_unusable(entry, kind, setting.term)
            if reason:
                found.setdefault((setting, kind, reason), []).append(row.name)
    return [
        model_diagnostic(resolution.spec, setting.pos, "RD104", f"'{kind}' cannot take effect on {name_list(names)}: {reason}")
        for (setting, kind, reason), names in found.items()
    ]


def _reference_index(reference: Mapping[str, Any]) -> dict[str, Any]:
    """Reference keys as parameter names: wrapper segments removed, and DDP's ``module.`` when every
    key has it. The key as written wins where both readings exist (a model's own child may be
    called ``module``)."""
    index = {canonical_name(k): v for k, v in reference.items()}
    if index and all(k.startswith("module.") for k in reference):
        for key, value in reference.items():
            index.setdefault(canonical_name(key.removeprefix("module.")), value)
    return index


def _find_reference(entry: ParamEntry, index: dict[str, Any]) -> Any:
    """The reference entry under any of the tensor's names (a tied weight has several)."""
    return next((index[n] for n in entry.names if n in index), None)


def reference_problems(resolution: Resolution, reference: Mapping[str, Any] | None) -> list[Diagnostic]:
    """RD105: what keeps ``l2 ... to ref`` from finding its ``w0`` in ``reference``."""
    found: dict[tuple[Setting, str], list[str]] = {}
    index = _reference_index(reference) if reference is not None else {}
    for entry, row in zip(resolution.table.entries, resolution.rows):
        setting = row.terms.get("l2")
        if not entry.trainable or setting is None or setting.term.to != "ref" or always_zero(setting.term):
            continue
        if reference is None:
            found.setdefault((setting, "no reference was given: compile with spec.compile(model, reference=state_dict)"), [])
            continue
        value = _find_reference(entry, index)
        if value is None:
            found.setdefault((setting, "the reference has no entry for"), []).append(row.name)
        elif tuple(value.shape) != tuple(entry.param.shape):
            found.setdefault(
                (
                    setting,
                    (f"the reference's shape {_shape_text(tuple(value.shape))} differs from the parameter's "
                    f"{_shape_text(tuple(entry.param.shape))} for"),
                ),
                [],
            ).append(row.name)
    return [
        model_diagnostic(
            resolution.spec, setting.pos, "RD105",
            f"'l2 ... to ref': {reason}" + (f" {name_list(names)}" if names else ""),
        )
        for (setting, reason), names in found.items()
    ]


def name_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def model_diagnostic(spec: Spec, pos: Span | None, code: str, message: str) -> Diagnostic:
    """A diagnostic about the spec against a model, pinned to ``pos`` in the spec's source."""
    line, column = (pos.line, pos.column) if pos else (0, 0)
    return Diagnostic(
        line=line,
        column=column,
        end_line=pos.end_line if pos else None,
        end_column=pos.end_column if pos else None,
        message=message,
        file=spec.origin or "<string>",
        severity=severity(code),
        kind="model",
        code=code,
        source_line=source_line_at(spec.source, line) if spec.source and pos else "",
    )


class Regularizer:
    """A spec resolved against one model.

    ``param_groups()`` feeds the optimizer, ``penalty()`` the loss, ``attach()``
    (or ``after_step()``) runs what happens after each optimizer step, and
    ``explain()`` says what every parameter got and from which line. Terms that
    cannot work on their parameter raise :class:`RegCompileError` here, before
    anything is half-applied.
    """

    def __init__(self, spec: Spec, model: nn.Module, reference: Mapping[str, torch.Tensor] | None = None):
        self.spec = spec
        self.resolution = resolve(spec, model)
        problems = unusable_terms(self.resolution) + reference_problems(self.resolution, reference)
        if problems:
            raise RegCompileError(problems)
        self.table = self.resolution.table
        self._rows = self.resolution.rows
        self._groups = self.resolution.groups()
        self._step = 0
        self._scheduled_decays = [(k, m) for k, m in self._groups if k.decay is not None and is_scheduled(k.decay)]
        self._decay_identity: tuple[tuple[int, int], ...] | None = None
        self._decay_index: list[tuple[GroupKey, int]] = []
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._hooks: list[Any] = []
        self._hook_finalizer = weakref.finalize(self, _remove_all, self._hooks)
        index = _reference_index(reference) if reference is not None else {}
        loss, post = [], []
        self._references: dict[str, LossItem] = {}
        for entry in self.table.entries:
            if not entry.trainable:
                continue
            terms = self._rows[entry.index].terms
            for kind in ("l1", "l2", "group_lasso", "orthogonal"):
                setting = terms.get(kind)
                if setting is None or always_zero(setting.term):
                    continue  # a term that is 0 at every step needs nothing, not even a reference
                term = setting.term
                if kind == "l1" and term.prox:
                    post.append(PostStepItem("prox", entry.name, entry.param, term))
                    continue
                item = LossItem(kind, entry.param, term, self._reference(entry, term, index))
                if item.reference is not None:
                    self._references[entry.name] = item
                loss.append(item)
            if "max_norm" in terms:
                post.append(PostStepItem("max_norm", entry.name, entry.param, terms["max_norm"].term))
        self._penalty = PenaltyPlan(loss)
        self._post = PostStepPlan(post)
        self._activity = ActivityPlan(
            [
                ActivityTarget(row.name, self.table.modules_by_name[row.name], setting.term, self._bad_output(setting))
                for row in self.resolution.modules
                for setting in row.terms.values()
                if not always_zero(setting.term)
            ]
        )
        self._first_trainable = next((e.param for e in self.table.entries if e.trainable), None)

    @staticmethod
    def _reference(entry: ParamEntry, term: Any, index: dict[str, Any]) -> torch.Tensor | None:
        if target := getattr(term, "to", None):
            source = entry.param if target == "init" else _find_reference(entry, index)
            assert source is not None  # reference_problems() has refused a missing one
            # A copy in the source's own precision (a float64 pretrained state stays float64).
            return source.detach().to(device=entry.param.device, copy=True)
        return None

    def _bad_output(self, setting: Setting) -> Any:
        spec = self.spec

        def error(name: str, type_name: str) -> RegCompileError:
            kind = kind_label(setting.term.kind)
            return RegCompileError(
                [
                    model_diagnostic(
                        spec, setting.pos, "RD106",
                        f"'{kind}' needs a tensor output, but module '{module_label(name)}' returned a {type_name}; "
                        "select a submodule whose output is one tensor",
                    )
                ]
            )

        return error

    # ------------------------------------------------------------ optimizer

    def param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Parameter groups for any ``torch.optim`` optimizer; each trainable tensor appears once.

        Keyword arguments (``lr=...``, ``betas=...``) are copied into every group. A group
        with ``lr_mult m`` gets ``lr = m · lr``: LR schedulers scale each group's own lr,
        so the ratio holds through any of them.
        """
        for key in ("params", "weight_decay", "name"):
            if key in defaults:
                raise RegUsageError(
                    f"param_groups() does not take {key!r}: the rule file sets it"
                    + (" (write 'all decay VALUE' for a default decay)" if key == "weight_decay" else "")
                )
        if "lr" not in defaults and any(key.lr_mult not in (None, 1.0) for key, _ in self._groups):
            raise RegUsageError(
                "the rule file sets lr_mult, so param_groups() needs the base learning rate: param_groups(lr=...)"
            )
        groups = []
        for key, members in self._groups:
            group = {
                "params": [e.param for e in members],
                "weight_decay": strength_at(key.decay, self._step) if key.decay else 0.0,
                "name": key.name,
                **defaults,
            }
            if key.lr_mult is not None:
                group["lr_mult"] = key.lr_mult
                if "lr" in defaults:
                    group["lr"] = defaults["lr"] * key.lr_mult
            groups.append(group)
        return groups

    def attach(self, optimizer: torch.optim.Optimizer) -> Regularizer:
        """Run :meth:`after_step` automatically after every ``optimizer.step()`` (torch's step hooks).

        Needs an optimizer built from :meth:`param_groups` when a ``decay`` has a schedule.
        """
        if self._optimizer is not None:
            raise RegUsageError("this regularizer is already attached to an optimizer; detach() first")
        if self._post.prox:
            self._post.locate(optimizer.param_groups)  # every proximal parameter must be in it
        self._write_decay(optimizer)
        self._activity.register()  # after a detach(), the forward hooks come back too
        self._hooks.append(optimizer.register_step_post_hook(functools.partial(_on_step, weakref.ref(self))))
        self._optimizer = weakref.ref(optimizer)
        return self

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call right after ``optimizer.step()`` when not attached: proximal steps and constraints
        with this step's strengths, then the step counter advances and every scheduled strength
        (and scheduled ``decay``, written into ``optimizer``'s groups) moves to the next step."""
        if self._optimizer is not None:
            raise RegUsageError("after_step() on an attached regularizer would count each step twice")
        if optimizer is None and (self._post.prox or self._scheduled_decays):
            raise RegUsageError(
                "after_step() needs the optimizer: "
                + ("'l1 ... prox' reads each group's learning rate" if self._post.prox else "a scheduled decay is written into its groups")
            )
        self._advance(optimizer)

    def _advance(self, optimizer: torch.optim.Optimizer | None) -> None:
        # Activity values no penalty() took belong to a step that is over; keeping them would hold graphs.
        self._activity.take()
        self._post.apply(self._step, optimizer.param_groups if optimizer is not None else None)
        self._set_step(self._step + 1, optimizer)

    def _set_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self._step = step
        self._penalty.set_step(step)
        self._activity.set_step(step)
        if optimizer is not None:
            self._write_decay(optimizer)

    def _write_decay(self, optimizer: torch.optim.Optimizer) -> None:
        """Write each scheduled decay's value at this step into its optimizer group."""
        for key, index in self._decay_groups(optimizer):
            optimizer.param_groups[index]["weight_decay"] = strength_at(key.decay, self._step)

    def _decay_groups(self, optimizer: torch.optim.Optimizer) -> list[tuple[GroupKey, int]]:
        """The optimizer group of each scheduled decay: one holding exactly its tensors, since a
        wider one would decay what the rules exclude. Found once per set of optimizer groups."""
        if not self._scheduled_decays:
            return []
        groups = optimizer.param_groups
        identity = tuple((id(g), id(g["params"])) for g in groups)
        if identity != self._decay_identity:
            found = []
            for key, members in self._scheduled_decays:
                wanted = {id(e.param) for e in members}
                index = next((i for i, g in enumerate(groups) if {id(p) for p in g["params"]} == wanted), None)
                if index is None:
                    raise RegUsageError(
                        f"the optimizer has no group '{key.name}': build it from reg.param_groups() "
                        "so a scheduled decay can be written into it"
                    )
                found.append((key, index))
            self._decay_index, self._decay_identity = found, identity
        return self._decay_index

    def detach(self) -> None:
        """Remove the optimizer hook and the forward hooks of activity terms."""
        _remove_all(self._hooks)
        self._activity.remove()
        self._optimizer = None

    @property
    def step(self) -> int:
        """Optimizer steps counted so far: the ``t`` of every schedule."""
        return self._step

    def strength(self, name: str, kind: str) -> float:
        """The effective strength of ``kind`` on parameter (or module) ``name`` at the current step; 0 if unset."""
        row = next((r for r in self._rows if name == r.name or name in r.aliases), None)
        settings = row.terms if row is not None else next((m.terms for m in self.resolution.modules if m.name == name), None)
        if settings is None:
            raise KeyError(f"no parameter or module named {name!r}")
        setting = settings.get(kind)
        if setting is None:
            return 0.0
        return strength_at(setting.term, self._step) if hasattr(setting.term, "strength") else setting.value

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The step counter and every ``w0`` of ``l2 ... to init|ref``, keyed by parameter name."""
        return {"step": self._step, "references": {name: item.reference for name, item in self._references.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: schedules continue from the saved step, references are the saved ones."""
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise RegUsageError(f"state_dict 'step' must be a whole number >= 0, got {step!r}")
        saved = state.get("references", {})
        missing = [name for name in self._references if name not in saved]
        if missing:
            raise RegUsageError(f"state_dict has no reference for {name_list(missing)}")
        for name, item in self._references.items():
            if tuple(saved[name].shape) != tuple(item.param.shape):
                raise RegUsageError(
                    f"state_dict reference for '{name}' has shape {_shape_text(tuple(saved[name].shape))}, "
                    f"the parameter {_shape_text(tuple(item.param.shape))}"
                )
        for name, item in self._references.items():
            item.reference, item.ref = saved[name].detach().to(device=item.param.device, copy=True), None
            item.follow()
        optimizer = self._optimizer() if self._optimizer is not None else None
        self._set_step(step, optimizer)

    # ------------------------------------------------------------ loss and reports

    def penalty(self) -> torch.Tensor:
        """Every loss term (``l1``, ``l2``, ``group_lasso``, ``orthogonal``, and the activity terms
        collected since the last call) as a differentiable 0-dim tensor."""
        # Read at each call: model.to() after compiling moves the parameters, and the zero must follow.
        device = self._first_trainable.device if self._first_trainable is not None else None
        total = self._penalty(device)
        for value in self._activity.take():
            # float64 activations keep their precision, as float64 parameters do.
            dtype = torch.promote_types(total.dtype, value.dtype)
            total = total.to(dtype) + value.to(device=total.device, dtype=dtype)
        return total

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
        trainable = sum(e.trainable for e in self.table.entries)
        return (
            f"<Regularizer {len(self.spec.statements)} statements, {trainable} trainable tensors, "
            f"{len(self._groups)} groups, step {self._step}>"
        )


def _on_step(reg_ref: weakref.ref[Regularizer], optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    reg = reg_ref()
    if reg is not None:
        reg._advance(optimizer)


def _remove_all(handles: list[Any]) -> None:
    while handles:
        handles.pop().remove()


def group_name(decay: float, term: DecayTerm | None = None, lr_mult: float | None = None) -> str:
    """``decay=0.05``, ``no_decay``, plus the decay's schedule and ``lr_mult=...`` when set."""
    # A scheduled decay that starts at 0 still decays later: it is named by its term, not 'no_decay'.
    name = f"decay={decay!r}" if decay or term is not None else "no_decay"
    if term is not None and is_scheduled(term):
        name += " " + format_schedule(term.schedule)
    if lr_mult is not None:
        name += f" lr_mult={lr_mult!r}"
    return name


def compile(
    rules: Spec | str | os.PathLike[str], model: nn.Module, reference: Mapping[str, torch.Tensor] | None = None
) -> Regularizer:
    """Compile a spec, or the ``.reg`` file at a path, against ``model``.

    ``reference`` (a state_dict) supplies ``w0`` for ``l2 ... to ref``.
    """
    spec = rules if isinstance(rules, Spec) else load(rules)
    return spec.compile(model, reference=reference)
