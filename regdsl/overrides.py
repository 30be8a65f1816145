"""RD103, RD203, RD204: rules that later lines override, tied aliases split between rules, decay on l2."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import Diagnostic, model_diagnostic, name_list
from .resolution import Resolution
from .schedule import always_zero
from .select import ParamEntry, atom_matches
from .spec import NOT_REGULARIZERS, PARAM_TERMS, Exclude, NoneTerm, Rule, Selector
from .unmatched import acts_on_modules, acts_on_params


def dead_rules(res: Resolution) -> Iterable[Diagnostic]:
    """A rule is dead when, for every trainable parameter it selects and every kind it
    sets, a later rule sets that kind (or clears it with ``none``), or an exclude removes it."""
    statements = res.spec.statements
    trainable = [{i for i in m if res.table.entries[i].trainable} for m in res.matches]
    excluded_by: dict[int, list[int]] = {}
    for index, statement in enumerate(statements):
        if isinstance(statement, Exclude):
            for i in trainable[index]:
                excluded_by.setdefault(i, []).append(index)
    for index, statement in enumerate(statements):
        if not isinstance(statement, Rule) or not trainable[index] or not acts_on_params(statement):
            continue
        if acts_on_modules(statement):
            continue  # its activity terms are effects too, and they are not judged here
        if all(isinstance(t, NoneTerm) for t in statement.terms):
            continue  # a pure 'none' rule's effect depends on what came before; not judged here
        # A 'none' among other terms clears every regularization kind, so each is an effect of the rule.
        own = {t.kind for t in statement.terms if t.kind in PARAM_TERMS}
        has_none = any(isinstance(t, NoneTerm) for t in statement.terms)
        kinds = own | ({k for k in PARAM_TERMS if k not in NOT_REGULARIZERS} if has_none else set())
        overriders: set[int] = set()
        excluders: set[int] = set()
        dead = True
        for i in trainable[index]:
            for kind in kinds:
                if i in excluded_by and kind not in NOT_REGULARIZERS:
                    excluders.update(excluded_by[i])
                    continue
                later = [
                    j for j in range(index + 1, len(statements))
                    if i in trainable[j] and isinstance(statements[j], Rule)
                    and any(t.kind == kind or (t.kind == "none" and kind not in NOT_REGULARIZERS) for t in statements[j].terms)
                ]
                if not later:
                    dead = False
                    break
                overriders.add(later[-1])
            if not dead:
                break
        if dead:
            causes = [
                f"{verb} by {_lines(statements, which)}"
                for verb, which in (("overridden", overriders), ("excluded", excluders))
                if which
            ]
            yield model_diagnostic(
                res.spec, statement.pos, "RD103",
                f"rule has no effect: every parameter it selects is {' or '.join(causes)}",
            )


def _lines(statements: Sequence[Rule | Exclude], indices: set[int]) -> str:
    lines = sorted({statements[j].pos.line for j in indices if statements[j].pos})
    return f"line{'s' * (len(lines) != 1)} {', '.join(map(str, lines))}"



def _alias_view(entry: ParamEntry, k: int) -> ParamEntry:
    return ParamEntry(index=entry.index, param=entry.param, names=(entry.names[k],), owners=(entry.owners[k],))


def _selector_matches(selector: Selector, entry: ParamEntry) -> bool:
    return all(atom_matches(atom, entry) for atom in selector.atoms)


def tied_aliases(res: Resolution) -> Iterable[Diagnostic]:
    statements = res.spec.statements
    for entry in res.table.entries:
        if len(entry.names) < 2 or not entry.trainable:
            continue
        by_alias = [
            {j for j, s in enumerate(statements) if _selector_matches(s.selector, _alias_view(entry, k))}
            for k in range(len(entry.names))
        ]
        for a in range(len(by_alias)):
            for b in range(a + 1, len(by_alias)):
                only_a, only_b = by_alias[a] - by_alias[b], by_alias[b] - by_alias[a]
                if only_a and only_b:
                    first, second = sorted((min(only_a), min(only_b)))
                    name_of = {min(only_a): entry.names[a], min(only_b): entry.names[b]}
                    excluder = next((j for j in (first, second) if isinstance(statements[j], Exclude)), None)
                    consequence = (
                        f"the exclude on line {_line(statements[excluder])} removes every term from it"
                        if excluder is not None
                        else "both rules apply to the one tensor"
                    )
                    yield model_diagnostic(
                        res.spec, statements[second].pos, "RD203",
                        f"'{name_of[second]}' and '{name_of[first]}' are one tied tensor, but line "
                        f"{_line(statements[first])} selects it as '{name_of[first]}' and this line as "
                        f"'{name_of[second]}': {consequence}",
                    )


def _line(statement: Rule | Exclude) -> str:
    return str(statement.pos.line) if statement.pos else "?"



def decay_and_l2(res: Resolution) -> Iterable[Diagnostic]:
    pairs: dict[tuple[object, object], list[str]] = {}
    for row in res.rows:
        decay, l2 = row.terms.get("decay"), row.terms.get("l2")
        # l2 toward a reference pulls elsewhere than decay does: not a double regularization.
        if decay and l2 and not always_zero(decay.term) and not always_zero(l2.term) and l2.term.to is None:
            pairs.setdefault((decay.pos, l2.pos), []).append(row.name)
    for (decay_pos, l2_pos), names in pairs.items():
        decay_line = decay_pos.line if decay_pos else "?"
        yield model_diagnostic(
            res.spec, l2_pos, "RD204",
            f"{name_list(names)} also get{'s' * (len(names) == 1)} decay from line {decay_line}: "
            "decay and l2 both shrink the weights (double regularization)",
        )

