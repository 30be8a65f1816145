"""Spec + model -> what every parameter and module gets, before anything is built.

Resolution happens once, here: for every parameter tensor and every term kind,
the last rule in file order that matches the tensor and sets that kind wins;
``none`` clears all regularization kinds at its position; any ``exclude`` that
matches the tensor removes every regularization term, wherever it stands
(``lr_mult`` is an optimizer setting, which neither touches). Activity terms
resolve the same way over modules instead of parameters.

``check``, ``explain`` and ``compile`` all start from the one :class:`Resolution`
this module makes, so they cannot disagree about what a rule selects. What the
result is lives here; how it is computed for tens of thousands of tensors, in
:mod:`regdsl.cascade`.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

from torch import nn

from .entries import Members
from .gcpause import paused_gc
from .printer import format_schedule, format_space
from .schedule import always_zero, is_scheduled
from .select import ParamTable
from .spec import MODULE_TERMS, NOT_REGULARIZERS, PARAM_TERMS, DecayTerm, Span, Spec


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
    # Read-only: rows the rules treat alike share one dict (a copy per tensor cost a dict per tensor).
    terms: dict[str, Setting] = field(default_factory=dict)
    # What the row's name alone does not say: a 'type' that matched through a base class,
    # a tensor that is the original of a parametrized one. explain() prints them.
    notes: tuple[str, ...] = ()
    # With lr_decay in the file (else None): its depth (the deepest where no rule gave one) and
    # its lr multiplier, lr_mult · lr_decay ** (deepest − depth) (regdsl.depth).
    depth: int | None = None
    lr_factor: float | None = None

    def __getattr__(self, name: str) -> Any:
        # resolve() leaves shape and numel to be read from the tensor when first asked: through
        # torch, each costs more than all the rest of a row, and compile() never asks.
        param = self.__dict__.get("_param") if name in ("shape", "numel") else None
        if param is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        shape = tuple(param.shape)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "numel", math.prod(shape))
        return self.__dict__[name]


class ParamRows(Sequence[ParamRow]):
    """One :class:`ParamRow` per table entry, in table order, each made when first read.

    ``compile()`` reads the rows of a few entries (one per outcome, and those a diagnostic
    names) and every entry's terms through :meth:`terms`; ``explain`` reads them all. Made
    for every tensor up front, they cost more than the rest of compiling a large model.
    """

    def __init__(self, of: Sequence[int], outcome_terms: Sequence[dict[str, Setting]], make: Callable[[int], ParamRow]):
        self._of, self._outcome_terms, self._make = of, outcome_terms, make
        self._rows: list[ParamRow | None] = [None] * len(of)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(len(self))[i])
        row = self._rows[i]
        if row is None:
            row = self._rows[i] = self._make(range(len(self))[i])
        return row

    def __iter__(self) -> Iterator[ParamRow]:
        return map(self.__getitem__, range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def terms(self, i: int) -> dict[str, Setting]:
        """Entry ``i``'s terms (shared, read-only), without making its row."""
        return self._outcome_terms[self._of[i]]

    def __repr__(self) -> str:
        return f"ParamRows({len(self)} rows)"


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
    space: str = ""  # the decay's search space ("loguniform(0.001, 0.1)"); weight_decay is then its stand-in


@dataclass(frozen=True)
class GroupKey:
    """What makes two parameters share an optimizer group."""

    decay: DecayTerm | None
    lr_mult: float | None
    # The search spaces the two depend on, by name (a file's check and explain run at stand-in values):
    # separate spaces are separate settings once valued, even where their stand-ins are equal.
    spaces: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        name = group_name(self.decay.strength if self.decay else 0.0, self.decay, self.lr_mult)
        return name + (f" ({', '.join(self.spaces)})" if self.spaces else "")


@dataclass(frozen=True)
class Resolution:
    """What a spec means for one model, before anything is built for the optimizer."""

    spec: Spec
    table: ParamTable
    rows: Sequence[ParamRow]  # one per table entry, same order (a ParamRows, made as they are read)
    matches: tuple[tuple[int, ...], ...]  # per statement: entries its selector matches, frozen ones too
    modules: tuple[ModuleRow, ...] = ()  # one per module some rule gives an activity term, in registration order
    module_matches: tuple[tuple[str, ...], ...] = ()  # per statement: names of the modules it selects
    # Per entry, a number shared by exactly the entries whose rows say the same (terms, exclude,
    # 'none'): what depends only on that is worked out once per number, not once per tensor.
    outcomes: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # Per statement: the trainable entries among its matches (the same tuple for the same selector).
    trainable_matches: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)
    # Each entry's depth and lr factor (regdsl.depth.Depths), for a file with lr_decay; else None.
    depths: Any = field(default=None, compare=False, repr=False)

    def outcome_of(self) -> tuple[int, ...] | range:
        """:attr:`outcomes`, or every row on its own for a resolution built without them."""
        return self.outcomes or range(len(self.rows))

    @functools.cached_property
    def _representatives(self) -> dict[int, int]:
        return dict(zip(self.outcome_of(), range(len(self.rows))))

    def representatives(self) -> dict[int, int]:
        """Each outcome and the index of one entry that has it (its row says what all of theirs say)."""
        return self._representatives

    def entries_with(self, outcomes: set[int]) -> Iterator[int]:
        """Indices of the entries whose outcome is one of ``outcomes``, in table order."""
        if not outcomes:
            return iter(())
        return compress(range(len(self.rows)), map(outcomes.__contains__, self.outcome_of()))

    def terms_of(self, i: int) -> dict[str, Setting]:
        """Entry ``i``'s terms (read-only), without making its row when the rows are lazy."""
        rows = self.rows
        return rows.terms(i) if isinstance(rows, ParamRows) else rows[i].terms

    def setting(self, name: str, kind: str) -> Setting | None:
        """The ``kind`` term parameter (or module) ``name`` gets, None when unset; KeyError for a name
        neither has, or a kind that does not exist (a misspelt one would read as unset)."""
        row = next((r for r in self.rows if name == r.name or name in r.aliases), None)
        settings = row.terms if row is not None else next((m.terms for m in self.modules if m.name == name), None)
        if settings is None:
            raise KeyError(f"no parameter named {name!r}, nor a module with an activity term")
        if kind not in (kinds := PARAM_TERMS + MODULE_TERMS):
            raise KeyError(f"no term kind {kind!r}: one of {', '.join(kinds)}")
        return settings.get(kind)

    def trainable_of(self) -> tuple[tuple[int, ...], ...]:
        if self.trainable_matches or not self.matches:
            return self.trainable_matches
        flags = self.table.trainable
        return tuple(tuple(i for i in m if flags[i]) for m in self.matches)

    def groups(self) -> list[tuple[GroupKey, Members]]:
        """Trainable entries by (decay, lr_mult), groups ordered by first member.

        Equal settings share a group: fewer groups keep torch.optim on its
        foreach/fused paths, and the order is reproducible.
        """
        groups: dict[GroupKey, list[int]] = {}
        key_of: dict[int, GroupKey] = {}  # by outcome: one key per outcome, not per tensor
        for outcome, i in self.representatives().items():
            terms = self.terms_of(i)
            decay, mult = terms.get("decay"), terms.get("lr_mult")
            term = decay.term if decay is not None and not always_zero(decay.term) else None
            # lr_mult 1 is the optimizer's own lr: the same group as no lr_mult at all.
            factor = mult.value if mult is not None and mult.value != 1.0 else None
            spaces = tuple(s.term._space_name for s in (decay, mult) if s is not None and s.term._space_name is not None)
            key_of[outcome] = GroupKey(term, factor, spaces)
        if self.depths is not None:
            return self._depth_groups(key_of)
        members_of = {outcome: groups.setdefault(key, []) for outcome, key in key_of.items()}
        # Each trainable entry's index appended to its group's list in one C-level pass (tens of
        # thousands of tensors); the groups make no entry (regdsl.entries).
        flags = self.table.trainable
        lists = map(members_of.__getitem__, compress(self.outcome_of(), flags))
        deque(map(list.append, lists, compress(range(len(flags)), flags)), maxlen=0)
        entries = self.table.entries
        return [(k, Members(entries, m)) for k, m in sorted(groups.items(), key=lambda group: group[1][:1]) if m]

    def _depth_groups(self, key_of: dict[int, GroupKey]) -> list[tuple[GroupKey, Members]]:
        """:meth:`groups` with depths: entries of one outcome part by lr factor, the multiplier
        being ``lr_mult · lr_decay ** (deepest − depth)`` (regdsl.depth)."""
        groups: dict[GroupKey, list[int]] = {}
        outcomes, depths, flags = self.outcome_of(), self.depths, self.table.trainable
        lr_decay = self.spec.lr_decay._space_name if self.spec.lr_decay is not None else None
        for i in compress(range(len(flags)), flags):
            key = key_of[outcomes[i]]
            factor = depths.factor(i)
            power = depths.deepest - depths.of(i)
            spaces = (*key.spaces, f"{lr_decay}**{power}") if lr_decay is not None and power else key.spaces
            if factor != 1.0 or spaces != key.spaces:
                mult = factor if key.lr_mult is None else key.lr_mult * factor
                key = GroupKey(key.decay, None if mult == 1.0 else mult, spaces)
            groups.setdefault(key, []).append(i)
        entries = self.table.entries
        return [(k, Members(entries, m)) for k, m in sorted(groups.items(), key=lambda group: group[1][0])]

    def groups_summary(self) -> list[GroupSummary]:
        return [
            GroupSummary(
                name=key.name,
                weight_decay=key.decay.strength if key.decay else 0.0,
                params=members.names,
                numel=members.numel,
                lr_mult=key.lr_mult if key.lr_mult is not None else 1.0,
                schedule=format_schedule(key.decay.schedule) if key.decay else "",
                space=str(key.decay.space) if key.decay is not None and key.decay.space is not None else "",
            )
            for key, members in self.groups()
        ]

    def coverage(self) -> Coverage:
        """How many tensors and elements get each regularization term, nothing, or are frozen."""
        kinds = [k for k in PARAM_TERMS if k not in NOT_REGULARIZERS]
        terms = {k: Count() for k in kinds}
        nothing, frozen, excluded = Count(), Count(), Count()
        active_of: dict[int, list[str]] = {}
        outcomes = self.outcome_of()
        for i, row in enumerate(self.rows):
            if not row.trainable:
                frozen.add(row.numel)
                continue
            if row.excluded_by:
                excluded.add(row.numel)
            active = active_of.get(outcomes[i])
            if active is None:
                active = active_of[outcomes[i]] = [
                    k for k, setting in row.terms.items() if k in terms and not always_zero(setting.term)
                ]
            for kind in active:
                terms[kind].add(row.numel)
            if not active:
                nothing.add(row.numel)
        return Coverage(terms=terms, nothing=nothing, excluded=excluded, frozen=frozen)


def resolve(spec: Spec, model: nn.Module) -> Resolution:
    """Apply the cascade: per parameter (or module) and term kind, the last matching rule that
    sets it wins; ``none`` clears at its position; any matching ``exclude`` removes everything
    but ``lr_mult``. See :mod:`regdsl.cascade` for how."""
    if not isinstance(spec, Spec):
        raise TypeError(f"resolve() takes a Spec (regdsl.parse(text) or regdsl.load(path)), not a {type(spec).__name__}")
    from .cascade import resolve_table
    from .spaces import stand_in

    # Search spaces resolve at a stand-in value (check, explain); compile refuses them earlier.
    spec = stand_in(spec)
    with paused_gc():  # tens of thousands of rows: collecting while they are made costs more than making them
        return resolve_table(spec, ParamTable(model))


def group_name(decay: float, term: DecayTerm | None = None, lr_mult: float | None = None) -> str:
    """``decay=0.05``, ``no_decay``, plus the decay's schedule and ``lr_mult=...`` when set."""
    # A scheduled decay that starts at 0 still decays later: it is named by its term, not 'no_decay'.
    name = f"decay={decay!r}" if decay or term is not None else "no_decay"
    if term is not None and term.space is not None:
        name = f"decay={format_space(term.space, definition=True)}"
    if term is not None and is_scheduled(term):
        name += " " + format_schedule(term.schedule)
    if lr_mult is not None:
        name += f" lr_mult={lr_mult!r}"
    return name

