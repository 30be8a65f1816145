"""Spec + model -> what every parameter and module gets, before anything is built.

Resolution happens once, here: for every parameter tensor and every term kind,
the last rule in file order that matches the tensor and sets that kind wins;
``none`` clears all regularization kinds at its position; any ``exclude`` that
matches the tensor removes every regularization term, wherever it stands
(``lr_mult`` is an optimizer setting, which neither touches). Activity terms
resolve the same way over modules instead of parameters.

``check``, ``explain`` and ``compile`` all start from the one :class:`Resolution`
this module makes, so they cannot disagree about what a rule selects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .printer import format_schedule
from .schedule import always_zero, is_scheduled
from .select import ParamEntry, ParamTable, base_class_match, module_class, module_matches
from .spec import MODULE_TERMS, NOT_REGULARIZERS, PARAM_TERMS, DecayTerm, Exclude, NoneTerm, Rule, Span, Spec, TypeAtom


@dataclass(frozen=True)
class Setting:
    """A term on one parameter (or module), and the rule that set it."""

    value: float
    origin: str | None
    pos: Span | None
    term: Any = None  # the spec's term node; None for an exclude or a 'none'
    # Index of the statement that set it. Not part of equality: it is where the pos already points.
    statement: int | None = field(default=None, compare=False, repr=False)

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
    # What the row's name alone does not say: a 'type' that matched through a base class,
    # a tensor that is the original of a parametrized one. explain() prints them.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleRow:
    """What the rule file does to one module's output (activity terms)."""

    name: str
    class_name: str
    excluded_by: Setting | None
    cleared_by: Setting | None
    terms: dict[str, Setting] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # as ParamRow.notes


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
    for index, statement in enumerate(spec.statements):
        matched = table.select(statement.selector)
        matches.append(tuple(e.index for e in matched))
        picked = [
            i
            for i, (name, module) in enumerate(table.modules)
            if with_activity and _selects_module(statement.selector, name, module)
        ]
        module_matches_.append(tuple(table.modules[i][0] for i in picked))
        params.apply(index, statement, [e.index for e in matched if e.trainable], PARAM_TERMS)
        modules.apply(index, statement, picked, MODULE_TERMS)
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
            notes=_parametrization_note(entry) + params.base_class_notes(entry.index, entry.owners),
        )
        for entry in table.entries
    )
    module_rows = tuple(
        ModuleRow(
            name=name,
            class_name=module_class(module).__name__,
            excluded_by=modules.excluded[i],
            cleared_by=modules.cleared[i],
            terms=modules.result(i, MODULE_TERMS),
            notes=modules.base_class_notes(i, (module,)),
        )
        for i, (name, module) in enumerate(table.modules)
        if modules.touched[i]
    )
    return Resolution(spec, table, rows, tuple(matches), module_rows, tuple(module_matches_))


def _selects_module(selector: Any, name: str, module: nn.Module) -> bool:
    return all(module_matches(atom, name, module) for atom in selector.atoms)


def _parametrization_note(entry: ParamEntry) -> tuple[str, ...]:
    # Terms act on the originals: the tensors the optimizer updates, so decay and l2 mean the same
    # thing here as anywhere (l2 = SGD's weight_decay), and decay could act on nothing else.
    if entry.parametrization is None:
        return ()
    tensor, how = entry.parametrization
    attribute = tensor.rsplit(".", 1)[-1]
    note = (
        f"an original of a parametrized {attribute} ({how}): terms act on this tensor, which the optimizer "
        f"updates, not on the {attribute} computed from it"
    )
    return (note,)


class _Cascade:
    """The per-target bookkeeping of :func:`resolve`, for parameters or for modules."""

    def __init__(self, size: int, origin: str | None):
        self.origin = origin
        self.assigned: list[dict[str, Setting]] = [{} for _ in range(size)]
        self.touched = [False] * size  # some rule set a term here (a later 'none' or exclude may remove it)
        self.excluded: list[Setting | None] = [None] * size
        self.cleared: list[Setting | None] = [None] * size
        self.statements: list[Any] = []

    def apply(self, index: int, statement: Any, targets: list[int], kinds: tuple[str, ...]) -> None:
        self.statements.append(statement)
        if isinstance(statement, Exclude):
            for i in targets:
                self.excluded[i] = self.excluded[i] or Setting(0.0, self.origin, statement.pos, statement=index)
            return
        for term in statement.terms:
            if not isinstance(term, NoneTerm) and term.kind not in kinds:
                continue
            for i in targets:
                if isinstance(term, NoneTerm):
                    for kind in [k for k in self.assigned[i] if k not in NOT_REGULARIZERS]:
                        del self.assigned[i][kind]
                    self.cleared[i] = Setting(0.0, self.origin, term.pos, statement=index)
                else:
                    self.assigned[i][term.kind] = Setting(term.value, self.origin, term.pos, term, statement=index)
                    self.touched[i] = True

    def result(self, i: int, kinds: tuple[str, ...]) -> dict[str, Setting]:
        kept = self.assigned[i]
        if self.excluded[i]:
            kept = {k: v for k, v in kept.items() if k in NOT_REGULARIZERS}
        return {k: kept[k] for k in kinds if k in kept}

    def base_class_notes(self, i: int, owners: tuple[nn.Module, ...]) -> tuple[str, ...]:
        """For each rule that shows in target ``i``'s row (a term it set, its exclude, its 'none'):
        a 'type' that matched only through a base class, so explain() can say which class it was."""
        shown = [*self.result(i, PARAM_TERMS + MODULE_TERMS).values(), self.excluded[i], self.cleared[i]]
        notes = []
        for index in sorted({s.statement for s in shown if s is not None and s.statement is not None}):
            statement = self.statements[index]
            for atom in statement.selector.atoms:
                if isinstance(atom, TypeAtom) and (match := base_class_match(atom, owners)):
                    pattern, cls, base = match
                    line = statement.pos.line if statement.pos else "?"
                    notes.append(
                        f"line {line}: 'type {pattern}' matched {cls.__name__} through its base class {base.__name__}"
                    )
        return tuple(notes)



def group_name(decay: float, term: DecayTerm | None = None, lr_mult: float | None = None) -> str:
    """``decay=0.05``, ``no_decay``, plus the decay's schedule and ``lr_mult=...`` when set."""
    # A scheduled decay that starts at 0 still decays later: it is named by its term, not 'no_decay'.
    name = f"decay={decay!r}" if decay or term is not None else "no_decay"
    if term is not None and is_scheduled(term):
        name += " " + format_schedule(term.schedule)
    if lr_mult is not None:
        name += f" lr_mult={lr_mult!r}"
    return name

