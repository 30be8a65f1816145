"""How :func:`regdsl.resolution.resolve` computes the cascade, at a cost that grows with the
model and the file, never with their product beyond what the selectors match.

Every target (a parameter tensor, or a module for activity terms) is in one
*outcome* at a time: what the statements read so far leave it with (terms,
exclude, 'none'). A statement moves all its targets that share an outcome to
the same next one, so it is worked out once per outcome it meets, and each
target costs one lookup per statement that selects it. Rows are then built per
tensor from their outcome's shared parts. A :class:`Setting` is made once per
statement and term, never per tensor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from .classes import base_class_match_of
from .depth import Depths, resolve_depths
from .entries import _uninitialized
from .matching import selector_key
from .resolution import ModuleRow, ParamRow, ParamRows, Resolution, Setting
from .select import ParamTable, module_class
from .spec import MODULE_TERMS, NOT_REGULARIZERS, PARAM_TERMS, Exclude, NoneTerm, Rule, Spec, TypeAtom


class Outcome:
    """What the statements read so far leave a target with."""

    __slots__ = ("_result", "_typed", "assigned", "cleared", "excluded", "touched")

    def __init__(self, assigned: dict[str, Setting], excluded: Setting | None, cleared: Setting | None, touched: bool):
        self.assigned = assigned
        self.excluded = excluded  # the first exclude that matched
        self.cleared = cleared  # the last 'none'
        self.touched = touched  # some rule set a term (a later 'none' or exclude may remove it)
        self._result: dict[str, Setting] | None = None
        self._typed: list[tuple[int, TypeAtom]] | None = None

    @property
    def result(self) -> dict[str, Setting]:
        """The terms a row shows: an exclude keeps only what is no regularizer (lr_mult); in the order of the kinds."""
        if self._result is None:
            kept = self.assigned
            if self.excluded:
                kept = {k: v for k, v in kept.items() if k in NOT_REGULARIZERS}
            self._result = {k: kept[k] for k in _ALL_KINDS if k in kept}
        return self._result


_ALL_KINDS = PARAM_TERMS + MODULE_TERMS


class Cascade:
    """Outcomes of the targets of one kind (parameters or modules), statement by statement."""

    def __init__(self, size: int, spec: Spec):
        self.origin = spec.origin
        self.statements = spec.statements
        self.outcomes = [Outcome({}, None, None, False)]
        self.of = [0] * size  # per target, its outcome's index
        self._notes: dict[tuple[int, tuple[type, ...]], tuple[str, ...]] = {}

    def outcome(self, i: int) -> Outcome:
        return self.outcomes[self.of[i]]

    def apply(self, index: int, statement: Any, targets: Sequence[int], kinds: tuple[str, ...]) -> None:
        if not targets:
            return
        if isinstance(statement, Rule) and not any(t.kind in kinds or isinstance(t, NoneTerm) for t in statement.terms):
            return  # nothing this cascade tracks: an activity-only rule among parameters, or the reverse
        settings = self._settings(index, statement)
        of, step = self.of, {}
        if len(targets) == len(of):  # every target: one pass in C
            for before in set(of):
                step[before] = self._next(self.outcomes[before], statement, settings, kinds)
            self.of = list(map(step.__getitem__, of))
            return
        # Each outcome met, in the order met, moved once; then every target moved in one C-level pass.
        for before in dict.fromkeys(map(of.__getitem__, targets)):
            step[before] = self._next(self.outcomes[before], statement, settings, kinds)
        deque(map(of.__setitem__, targets, map(step.__getitem__, map(of.__getitem__, targets))), maxlen=0)

    def _settings(self, index: int, statement: Any) -> list[Setting]:
        if isinstance(statement, Exclude):
            return [Setting(0.0, self.origin, statement.pos, statement=index)]
        return [
            Setting(0.0, self.origin, t.pos, statement=index)
            if isinstance(t, NoneTerm)
            else Setting(t.value, self.origin, t.pos, t, statement=index)
            for t in statement.terms
        ]

    def _next(self, outcome: Outcome, statement: Any, settings: list[Setting], kinds: tuple[str, ...]) -> int:
        assigned, excluded, cleared, touched = outcome.assigned, outcome.excluded, outcome.cleared, outcome.touched
        if isinstance(statement, Exclude):
            excluded = excluded or settings[0]
        else:
            assigned = dict(assigned)
            for term, setting in zip(statement.terms, settings):
                if isinstance(term, NoneTerm):
                    assigned = {k: v for k, v in assigned.items() if k in NOT_REGULARIZERS}
                    cleared = setting
                elif term.kind in kinds:
                    assigned[term.kind] = setting
                    touched = True
        self.outcomes.append(Outcome(assigned, excluded, cleared, touched))
        return len(self.outcomes) - 1

    def may_note(self, k: int) -> bool:
        """Whether a rule that shows in outcome ``k``'s rows has a 'type' atom: then :meth:`notes` may say something."""
        outcome = self.outcomes[k]
        if outcome._typed is None:
            shown = [*outcome.result.values(), outcome.excluded, outcome.cleared]
            indices = sorted({s.statement for s in shown if s is not None and s.statement is not None})
            outcome._typed = [
                (j, atom) for j in indices for atom in self.statements[j].selector.atoms if isinstance(atom, TypeAtom)
            ]
        return bool(outcome._typed)

    def notes(self, i: int, types: tuple[type, ...]) -> tuple[str, ...]:
        """For each rule that shows in target ``i``'s row (a term it set, its exclude, its 'none'):
        a 'type' that matched only through a base class, so explain() can say which class it was."""
        if not self.may_note(k := self.of[i]):
            return ()
        found = self._notes.get((k, types))  # a 'type' rule over a whole model: one answer per class
        if found is None:
            notes = []
            for j, atom in self.outcomes[k]._typed:
                if match := base_class_match_of(atom, types):
                    pattern, cls, base = match
                    line = self.statements[j].pos.line if self.statements[j].pos else "?"
                    notes.append(
                        f"line {line}: 'type {pattern}' matched {cls.__name__} through its base class {base.__name__}"
                    )
            found = self._notes[k, types] = tuple(notes)
        return found


def param_rows(table: ParamTable, params: Cascade, depths: Depths | None = None) -> ParamRows:
    """One row per entry, in table order, each made when first read (see ParamRows). Shape and
    numel are read from the tensor when first asked (see ParamRow), but a lazy parameter's are
    set at once: None and 0, as the table saw it."""
    of, outcomes, entries = params.of, params.outcomes, table.entries
    lazy: dict[type, bool] = {}
    new, setattr_ = object.__new__, object.__setattr__

    def make(i: int) -> ParamRow:
        entry, outcome = entries[i], outcomes[of[i]]
        notes = params.notes(i, entry.types) if params.may_note(of[i]) else ()
        if entry.plain is not True:
            notes = _parametrization_note(entry) + notes
        # The frozen dataclass's __init__ sets its fields one object.__setattr__ at a time. Same class, same fields.
        row = new(ParamRow)
        setattr_(row, "__dict__", {
            "name": entry.name, "aliases": entry._names[1:] if entry._names else (), "_param": entry.param,
            "trainable": entry.trainable, "excluded_by": outcome.excluded, "cleared_by": outcome.cleared,
            "terms": outcome.result, "notes": notes,
        })  # fmt: skip
        uninitialized = lazy.get(kind := type(entry.param))
        if uninitialized is None:
            uninitialized = lazy[kind] = _uninitialized(kind)
        if uninitialized:
            setattr_(row, "shape", None)
            setattr_(row, "numel", 0)
        if depths is not None:
            mult = outcome.result.get("lr_mult")
            factor = depths.factor(i) * (mult.value if mult is not None else 1.0)
            setattr_(row, "depth", depths.of(i))
            setattr_(row, "lr_factor", factor)
        return row

    return ParamRows(of, [outcome.result for outcome in outcomes], make)


def _parametrization_note(entry: Any) -> tuple[str, ...]:
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


def resolve_table(spec: Spec, table: ParamTable) -> Resolution:
    """:func:`regdsl.resolution.resolve` on a table already read."""
    matcher = table.matcher
    params = Cascade(len(table), spec)
    # Modules are only targets of activity terms; without one, no statement needs them.
    with_activity = any(t.kind in MODULE_TERMS for s in spec.statements if isinstance(s, Rule) for t in s.terms)
    modules = Cascade(len(table.modules) if with_activity else 0, spec)
    matches, trainable, module_matches = [], [], []
    names_of: dict[int, tuple[str, ...]] = {}
    for index, statement in enumerate(spec.statements):
        key = selector_key(statement.selector)
        matches.append(matcher.params(statement.selector, key))
        trainable.append(targets := matcher.trainable(statement.selector, key))
        params.apply(index, statement, targets, PARAM_TERMS)
        if not with_activity:
            module_matches.append(())
            continue
        picked = matcher.modules(statement.selector, key)
        modules.apply(index, statement, picked, MODULE_TERMS)
        if id(picked) not in names_of:
            names_of[id(picked)] = tuple(table.modules[i][0] for i in picked)
        module_matches.append(names_of[id(picked)])
    module_rows = tuple(
        ModuleRow(
            name=name,
            class_name=module_class(module).__name__,
            excluded_by=outcome.excluded,
            cleared_by=outcome.cleared,
            terms=dict(outcome.result),
            notes=modules.notes(i, (type(module),)),
        )
        for i, (name, module) in enumerate(table.modules if with_activity else ())
        if (outcome := modules.outcome(i)).touched
    )
    depths = resolve_depths(spec, table, matches)
    return Resolution(
        spec, table, param_rows(table, params, depths), tuple(matches), module_rows, tuple(module_matches),
        outcomes=tuple(params.of), trainable_matches=tuple(trainable), depths=depths,
    )
