"""RD103, RD203, RD204: rules that later lines override, tied aliases split between rules, decay on l2."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import filterfalse, repeat
from typing import Any

from .errors import Diagnostic, name_list
from .findings import model_diagnostic
from .matching import glob_of, selector_key
from .resolution import ModuleRow, Resolution
from .schedule import always_zero
from .select import ParamEntry, atom_matches
from .spec import MODULE_TERMS, NOT_REGULARIZERS, PARAM_TERMS, Exclude, LayerAtom, NoneTerm, Rule, Selector
from .unmatched import acts_on_modules, acts_on_params


def dead_rules(res: Resolution) -> Iterable[Diagnostic]:
    """A rule is dead when, for every trainable parameter it selects and every kind it
    sets, a later rule sets that kind (or clears it with ``none``), or an exclude removes it.

    One forward sweep finds, per parameter and kind, the last rule that sets it; a rule is
    then dead when it comes before that last setter on each of its parameters and kinds. Both
    are worked out per distinct selection (rules repeat selectors), never per pair of rules.
    """
    statements = res.spec.statements
    trainable = res.trainable_of()
    everything = res.matches

    def reach(index: int, kind: str) -> tuple[int, ...]:
        # A depth on a frozen parameter still counts: the deepest depth is over every parameter.
        return everything[index] if kind == "depth" else trainable[index]
    excludes = [index for index, statement in enumerate(statements) if isinstance(statement, Exclude)]
    excluded = set().union(*(trainable[index] for index in excludes))
    by_entry: dict[int, list[int]] = {}

    def excluded_by(i: int) -> list[int]:
        # Which excludes remove a parameter: asked only to word a dead rule's message, so made then.
        if not by_entry and excluded:
            for index in excludes:
                for j in trainable[index]:
                    by_entry.setdefault(j, []).append(index)
        return by_entry.get(i, [])

    last = _last_setters(statements, reach, len(res.table.entries))
    earliest: dict[tuple[int, str], float] = {}  # (selection, kind) -> the first of its last setters
    causes: dict[tuple[int, frozenset[str]], str] = {}
    modules = {row.name: row for row in res.modules}
    for index, statement in enumerate(statements):
        if not isinstance(statement, Rule) or all(isinstance(t, NoneTerm) for t in statement.terms):
            continue  # a pure 'none' rule's effect depends on what came before; not judged here
        found: list[str] = []  # for each part of the rule (parameter terms, activity terms), what undoes it
        # A 'none' among other terms clears every regularization kind, so each is an effect of the rule.
        own = {t.kind for t in statement.terms if t.kind in PARAM_TERMS}
        if own or any(isinstance(t, NoneTerm) for t in statement.terms):
            kinds = frozenset(own | (_REGULARIZERS if any(isinstance(t, NoneTerm) for t in statement.terms) else set()))
            if not any(reach(index, kind) for kind in kinds):
                continue  # a rule on frozen or no parameters is RD101/RD104's
            for kind in kinds:
                selected = reach(index, kind)
                key = (id(selected), kind)
                if key not in earliest:
                    # An excluded parameter has no regularizer left to override; lr_mult survives excludes.
                    unexcluded = selected if kind in NOT_REGULARIZERS else filterfalse(excluded.__contains__, selected)
                    earliest[key] = min(map(last[kind].__getitem__, unexcluded), default=math.inf)
                if earliest[key] <= index:
                    break
            else:
                key2 = (tuple(id(reach(index, kind)) for kind in sorted(kinds)), kinds)
                if key2 not in causes:
                    causes[key2] = _causes(statements, {k: reach(index, k) for k in kinds}, last, excluded, excluded_by)
                found.append(f"every parameter it selects is {causes[key2]}")
            if not found:
                continue
        if acts_on_modules(statement):
            undone = _activity_undone(statements, index, res.module_matches[index], modules)
            if undone is None:
                continue
            found.append(f"every module it selects is {undone}")
        yield model_diagnostic(res.spec, statement.pos, "RD103", f"rule has no effect: {', and '.join(found)}")


def _activity_undone(
    statements: Sequence[Rule | Exclude], index: int, names: Sequence[str], rows: dict[str, ModuleRow]
) -> str | None:
    """Which later lines undo a rule's activity terms on every module it selects (a later rule's term
    of the same kind, a 'none', an exclude), or None where one of them survives."""
    kinds = [t.kind for t in statements[index].terms if t.kind in MODULE_TERMS]  # type: ignore[union-attr]
    overriders: set[int] = set()
    excluders: set[int] = set()
    for name in names:
        row = rows.get(name)
        if row is None:
            return None
        for kind in kinds:
            setting = row.terms.get(kind)
            if any(s is not None and s.statement == index for s in (setting, row.cleared_by)):
                return None  # its term holds, or its own 'none' cleared it: either is the rule's doing
            if setting is None and row.excluded_by is not None:
                excluders.add(row.excluded_by.statement)  # type: ignore[arg-type]
            elif setting is None and row.cleared_by is not None:
                overriders.add(row.cleared_by.statement)  # type: ignore[arg-type]
            elif setting is None:
                return None
            else:
                overriders.add(setting.statement)  # type: ignore[arg-type]
    found = [f"{verb} by {_lines(statements, which)}" for verb, which in (("overridden", overriders), ("excluded", excluders)) if which]
    return " or ".join(found) or None


_REGULARIZERS = frozenset(k for k in PARAM_TERMS if k not in NOT_REGULARIZERS)


def _last_setters(
    statements: Sequence[Rule | Exclude], reach: Callable[[int, str], tuple[int, ...]], size: int
) -> dict[str, list[int]]:
    """Per kind that some rule sets, per parameter: the index of the last rule that sets the kind on
    it (a 'none' clears every regularizer), -1 if none does. ``reach(rule, kind)``: the parameters
    the rule sets that kind on (the trainable ones it selects; for depth, every one)."""
    newest: dict[tuple[int, str], int] = {}  # (selection, kind) -> its last rule: selections repeat
    selections: dict[int, tuple[int, ...]] = {}
    for index, statement in enumerate(statements):
        if not isinstance(statement, Rule):
            continue
        kinds = {t.kind for t in statement.terms if t.kind in PARAM_TERMS}
        if any(isinstance(t, NoneTerm) for t in statement.terms):
            kinds |= _REGULARIZERS
        for kind in kinds:
            selection = reach(index, kind)
            if selection:
                selections[id(selection)] = selection
                newest[id(selection), kind] = index
    # Only the kinds some rule sets: dead_rules() asks for no other, and each list is one per tensor.
    last = {kind: [-1] * size for kind in dict.fromkeys(kind for _, kind in newest)}
    # In file order, so a later rule's index simply overwrites: one C-level pass per selection.
    for (selection, kind), index in sorted(newest.items(), key=lambda item: item[1]):
        deque(map(last[kind].__setitem__, selections[selection], repeat(index)), maxlen=0)
    return last


def _causes(
    statements: Sequence[Rule | Exclude],
    selections: dict[str, tuple[int, ...]],
    last: dict[str, list[int]],
    excluded: set[int],
    excluded_by: Callable[[int], list[int]],
) -> str:
    overriders: set[int] = set()
    hidden = False  # some parameter's regularizers are removed by an exclude
    for kind, selected in selections.items():
        for i in selected:
            if i in excluded and kind not in NOT_REGULARIZERS:
                hidden = True
            else:
                overriders.add(last[kind][i])
    excluders = {j for kind, selected in selections.items() for i in selected for j in excluded_by(i)} if hidden else set()
    found = [
        f"{verb} by {_lines(statements, which)}" for verb, which in (("overridden", overriders), ("excluded", excluders)) if which
    ]
    return " or ".join(found)


def _lines(statements: Sequence[Rule | Exclude], indices: set[int]) -> str:
    lines = sorted({statements[j].pos.line for j in indices if statements[j].pos})
    return f"line{'s' * (len(lines) != 1)} {', '.join(map(str, lines))}"



def _alias_view(entry: ParamEntry, k: int) -> ParamEntry:
    return ParamEntry(index=entry.index, param=entry.param, names=(entry.names[k],), owners=(entry.owners[k],))


def _selector_matches(selector: Selector, view: ParamEntry) -> bool:
    return all(_view_matches(atom, view) for atom in selector.atoms)


def _view_matches(atom: Any, view: ParamEntry) -> bool:
    """:func:`atom_matches` on one alias; a layer glob as the table's matcher reads it (a literal one
    needs no regex, a wildcard one shares its tail's), so a long file compiles next to nothing here."""
    if not isinstance(atom, LayerAtom):
        return atom_matches(atom, view)
    subjects = {*view.names, *view.tensors}
    return any(glob_of(p.text).under(s) for p in atom.patterns for s in subjects)


def _selected_by(statements: Sequence[Rule | Exclude], keys: list[tuple[Any, ...]], view: ParamEntry) -> set[int]:
    """Statements whose selector matches ``view``, each distinct selector judged once."""
    judged: dict[tuple[Any, ...], bool] = {}
    out = set()
    for j, (statement, key) in enumerate(zip(statements, keys)):
        if not acts_on_params(statement):
            continue  # activity terms act on a module's output, never on the tensor
        hit = judged.get(key)
        if hit is None:
            hit = judged[key] = _selector_matches(statement.selector, view)
        if hit:
            out.add(j)
    return out


def tied_aliases(res: Resolution) -> Iterable[Diagnostic]:
    statements = res.spec.statements
    tied = [e for e in map(res.table.entries.__getitem__, res.table.tied) if e.trainable]
    keys = [selector_key(s.selector) for s in statements] if tied else []
    for entry in tied:
        by_alias = [_selected_by(statements, keys, _alias_view(entry, k)) for k in range(len(entry.names))]
        for a in range(len(by_alias)):
            for b in range(a + 1, len(by_alias)):
                only_a, only_b = by_alias[a] - by_alias[b], by_alias[b] - by_alias[a]
                if only_a and only_b:
                    first, second = sorted((min(only_a), min(only_b)))
                    name_of = {min(only_a): entry.names[a], min(only_b): entry.names[b]}
                    yield model_diagnostic(
                        res.spec, statements[second].pos, "RD203",
                        f"'{name_of[second]}' and '{name_of[first]}' are one tied tensor, but line "
                        f"{_line(statements[first])} selects it as '{name_of[first]}' and this line as "
                        f"'{name_of[second]}': {_consequence(statements[first], statements[second])}",
                    )


def _consequence(first: Rule | Exclude, second: Rule | Exclude) -> str:
    """What two statements that select one tensor by two names do to it together."""
    excluder = next((s for s in (first, second) if isinstance(s, Exclude)), None)
    if excluder is not None:
        return f"the exclude on line {_line(excluder)} removes every regularization term from it"
    assert isinstance(first, Rule) and isinstance(second, Rule)
    if any(isinstance(t, NoneTerm) for t in second.terms):
        return f"this line's 'none' clears line {_line(first)}'s regularization terms from it"
    kinds = [{t.kind for t in rule.terms if t.kind in PARAM_TERMS} for rule in (first, second)]
    shared = sorted(kinds[0] & kinds[1], key=PARAM_TERMS.index)
    if not shared:
        return "the terms of both rules apply to the one tensor"
    others = "; the other terms of both apply" if kinds[0] != kinds[1] else ""
    return f"this line's {', '.join(shared)} replace{'s' * (len(shared) == 1)} line {_line(first)}'s{others}"


def _line(statement: Rule | Exclude) -> str:
    return str(statement.pos.line) if statement.pos else "?"



def decay_and_l2(res: Resolution) -> Iterable[Diagnostic]:
    pairs: dict[tuple[object, object], list[str]] = {}
    both: dict[int, tuple[object, object]] = {}  # by outcome: rows alike say the same
    for outcome, i in res.representatives().items():
        decay, l2 = res.rows[i].terms.get("decay"), res.rows[i].terms.get("l2")
        # l2 toward a reference pulls elsewhere than decay does: not a double regularization.
        if decay and l2 and not always_zero(decay.term) and not always_zero(l2.term) and l2.term.to is None:
            both[outcome] = (decay.pos, l2.pos)
    outcomes = res.outcome_of()
    for i in res.entries_with(set(both)):
        pairs.setdefault(both[outcomes[i]], []).append(res.rows[i].name)
    for (decay_pos, l2_pos), names in pairs.items():
        decay_line = decay_pos.line if decay_pos else "?"
        yield model_diagnostic(
            res.spec, l2_pos, "RD204",
            f"{name_list(names)} also get{'s' * (len(names) == 1)} decay from line {decay_line}: "
            "decay and l2 both shrink the weights (double regularization)",
        )
