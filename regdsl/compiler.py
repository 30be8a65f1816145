"""Spec + model -> optimizer parameter groups and a loss penalty.

Resolution happens once, here: for every parameter tensor and every term kind,
the last rule in file order that matches the tensor and sets that kind wins;
``none`` clears all kinds at its position; any ``exclude`` that matches the
tensor removes every term, wherever it stands. Per-step work is left to
:mod:`regdsl.penalties` (the penalty) and to the optimizer (``decay``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .build import load
from .codes import severity
from .errors import Diagnostic, RegCompileError, RegUsageError, source_line_at
from .penalties import FORMULAS, PenaltyPlan
from .select import ParamEntry, ParamTable, is_embedding_module
from .spec import VALUE_TERMS, Exclude, NoneTerm, Span, Spec


@dataclass(frozen=True)
class Setting:
    """A term's value on one parameter, and the rule that set it."""

    value: float
    origin: str | None
    pos: Span | None

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
    weight_decay: float
    params: tuple[str, ...]
    numel: int


@dataclass(frozen=True)
class Resolution:
    """What a spec means for one model, before anything is built for the optimizer."""

    spec: Spec
    table: ParamTable
    rows: tuple[ParamRow, ...]  # one per table entry, same order
    matches: tuple[tuple[int, ...], ...]  # per statement: entries its selector matches, frozen ones too

    def groups(self) -> list[tuple[float, list[ParamEntry]]]:
        """Trainable entries by ``weight_decay``, groups ordered by first member.

        Equal settings share a group: fewer groups keep torch.optim on its
        foreach/fused paths, and the order is reproducible.
        """
        groups: dict[float, list[ParamEntry]] = {}
        for entry, row in zip(self.table.entries, self.rows):
            if entry.trainable:
                decay = row.terms.get("decay")
                groups.setdefault(decay.value if decay else 0.0, []).append(entry)
        return list(groups.items())

    def groups_summary(self) -> list[GroupSummary]:
        return [
            GroupSummary(
                name=group_name(decay),
                weight_decay=decay,
                params=tuple(e.name for e in members),
                numel=sum(e.numel for e in members),
            )
            for decay, members in self.groups()
        ]

    def coverage(self) -> Coverage:
        """How many tensors and elements get each term, nothing, or are frozen."""
        terms = {k: Count() for k in VALUE_TERMS}
        nothing, frozen, excluded = Count(), Count(), Count()
        for row in self.rows:
            if not row.trainable:
                frozen.add(row.numel)
                continue
            if row.excluded_by:
                excluded.add(row.numel)
            active = [k for k, setting in row.terms.items() if setting.value > 0]
            for kind in active:
                terms[kind].add(row.numel)
            if not active:
                nothing.add(row.numel)
        return Coverage(terms=terms, nothing=nothing, excluded=excluded, frozen=frozen)


def resolve(spec: Spec, model: nn.Module) -> Resolution:
    """Apply the cascade: per parameter and term kind, the last matching rule that sets it wins;
    ``none`` clears at its position; any matching ``exclude`` removes everything."""
    table = ParamTable(model)
    origin = spec.origin
    assigned: list[dict[str, Setting]] = [{} for _ in table.entries]
    excluded: list[Setting | None] = [None] * len(table)
    cleared: list[Setting | None] = [None] * len(table)
    matches = []
    for statement in spec.statements:
        matched = table.select(statement.selector)
        matches.append(tuple(e.index for e in matched))
        selected = [e.index for e in matched if e.trainable]
        if isinstance(statement, Exclude):
            for i in selected:
                excluded[i] = excluded[i] or Setting(0.0, origin, statement.pos)
            continue
        for term in statement.terms:
            for i in selected:
                if isinstance(term, NoneTerm):
                    assigned[i].clear()
                    cleared[i] = Setting(0.0, origin, term.pos)
                else:
                    assigned[i][term.kind] = Setting(term.strength, origin, term.pos)
    rows = tuple(
        ParamRow(
            name=entry.name,
            aliases=entry.names[1:],
            shape=entry.shape,
            numel=entry.numel,
            trainable=entry.trainable,
            excluded_by=excluded[entry.index],
            cleared_by=cleared[entry.index],
            terms={}
            if excluded[entry.index]
            else {k: assigned[entry.index][k] for k in VALUE_TERMS if k in assigned[entry.index]},
        )
        for entry in table.entries
    )
    return Resolution(spec, table, rows, tuple(matches))


def unusable_terms(resolution: Resolution) -> list[Diagnostic]:
    """Terms the file sets that cannot work on their parameter (RD104), one diagnostic per rule and cause."""
    found: dict[tuple[Setting, str, str], list[str]] = {}
    for entry, row in zip(resolution.table.entries, resolution.rows):
        for kind, setting in row.terms.items():
            if setting.value == 0:
                continue  # a zero term does nothing, so it cannot fail either
            reason = None
            if not entry.initialized and kind in FORMULAS:
                reason = "a lazy module's parameters have no shape until its first forward pass; run one before compiling"
            elif kind == "decay" and any(getattr(o, "sparse", False) for o in entry.owners if is_embedding_module(o)):
                reason = "an embedding with sparse=True gets sparse gradients, and torch optimizers cannot decay them"
            elif any("_flat_param" in name.split(".") for name in entry.names):
                reason = "FSDP's flattened parameter takes no per-parameter rules; wrap with FSDP(use_orig_params=True)"
            if reason:
                found.setdefault((setting, kind, reason), []).append(row.name)
    return [
        model_diagnostic(resolution.spec, setting.pos, "RD104", f"'{kind}' cannot take effect on {name_list(names)}: {reason}")
        for (setting, kind, reason), names in found.items()
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

    ``param_groups()`` feeds the optimizer, ``penalty()`` the loss, and
    ``explain()`` says what every parameter got and from which line. Terms that
    cannot work on their parameter raise :class:`RegCompileError` here, before
    anything is half-applied.
    """

    def __init__(self, spec: Spec, model: nn.Module):
        self.spec = spec
        self.resolution = resolve(spec, model)
        problems = unusable_terms(self.resolution)
        if problems:
            raise RegCompileError(problems)
        self.table = self.resolution.table
        self._rows = self.resolution.rows
        self._groups = self.resolution.groups()
        trainable = [e for e in self.table.entries if e.trainable]
        self._penalty = PenaltyPlan(
            [
                (kind, entry.param, self._rows[entry.index].terms[kind].value)
                for entry in trainable
                for kind in FORMULAS
                if kind in self._rows[entry.index].terms
            ]
        )
        self._first_trainable = trainable[0].param if trainable else None

    # ------------------------------------------------------------ public API

    def param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Parameter groups for any ``torch.optim`` optimizer; each trainable tensor appears once.

        Keyword arguments (``lr=...``, ``betas=...``) are copied into every group.
        """
        for key in ("params", "weight_decay", "name"):
            if key in defaults:
                raise RegUsageError(
                    f"param_groups() does not take {key!r}: the rule file sets it"
                    + (" (write 'all decay VALUE' for a default decay)" if key == "weight_decay" else "")
                )
        return [
            {"params": [e.param for e in members], "weight_decay": decay, "name": group_name(decay), **defaults}
            for decay, members in self._groups
        ]

    def penalty(self) -> torch.Tensor:
        """The sum of every loss term (``l1``, ``l2``) as a differentiable 0-dim tensor."""
        device = self._first_trainable.device if self._first_trainable is not None else None
        return self._penalty(device)

    def explain(self) -> list[ParamRow]:
        """One row per parameter tensor (frozen ones too), in registration order."""
        return list(self._rows)

    def groups_summary(self) -> list[GroupSummary]:
        """Each optimizer group: name, weight_decay, member names, element count."""
        return self.resolution.groups_summary()

    def coverage(self) -> Coverage:
        return self.resolution.coverage()

    def __repr__(self) -> str:
        trainable = sum(e.trainable for e in self.table.entries)
        return f"<Regularizer {len(self.spec.statements)} statements, {trainable} trainable tensors, {len(self._groups)} groups>"


def group_name(decay: float) -> str:
    return f"decay={decay!r}" if decay else "no_decay"


def compile(rules: Spec | str | os.PathLike[str], model: nn.Module) -> Regularizer:
    """Compile a spec, or the ``.reg`` file at a path, against ``model``."""
    spec = rules if isinstance(rules, Spec) else load(rules)
    return spec.compile(model)
