"""Model-aware linting: what a rule file does to a real model, and what it fails to do.

``check(spec, model)`` returns diagnostics (codes in :mod:`regdsl.codes`):
patterns and selectors that match nothing, type names no module has, rules
whose every effect a later line overrides, terms that cannot work on their
parameter, excludes that match nothing, rules that hit only frozen parameters,
tied parameters whose names different rules pick, and decay stacked on l2.

What is checked statically, without running the model, is only what the
parameters and modules show: a loss term on a parameter that the forward pass
never uses cannot be seen here (the model is never run, and may live on meta).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from torch import nn

from .compiler import Resolution, model_diagnostic, name_list, resolve, unusable_terms
from .errors import Diagnostic
from .schedule import always_zero
from .select import ParamEntry, atom_matches, class_names, glob_regex
from .spec import (
    MODULE_TERMS,
    NOT_REGULARIZERS,
    PARAM_TERMS,
    Exclude,
    LayerAtom,
    NoneTerm,
    Rule,
    Selector,
    Spec,
    TypeAtom,
    kind_label,
)


def check(spec: Spec, model: nn.Module) -> list[Diagnostic]:
    """Every problem of ``spec`` against ``model``, sorted by position."""
    return check_resolution(resolve(spec, model))


def check_resolution(resolution: Resolution) -> list[Diagnostic]:
    """:func:`check` on a resolution already made (the CLI also reads its coverage)."""
    diagnostics: list[Diagnostic] = []
    diagnostics += _unmatched(resolution)
    diagnostics += _only_frozen(resolution)
    diagnostics += _dead_rules(resolution)
    diagnostics += unusable_terms(resolution)
    diagnostics += _tied_aliases(resolution)
    diagnostics += _decay_and_l2(resolution)
    return sorted(diagnostics, key=Diagnostic.sort_key)


# ---------------------------------------------------------------- RD101, RD102, RD201


def _unmatched(res: Resolution) -> Iterable[Diagnostic]:
    spec, table = res.spec, res.table
    all_paths = sorted({p for e in table.entries for p in e.paths})
    all_classes = sorted({n for m in table.module_names.values() for n in class_names(type(m))})
    owner_classes = {n for e in table.entries for n in e.owner_class_names}
    module_names = [name for name, _ in table.modules]
    module_classes = sorted({n for _, m in table.modules for n in class_names(type(m))})
    with_activity = {m.name for m in res.modules}
    for statement, matched, modules in zip(spec.statements, res.matches, res.module_matches):
        if _acts_on_modules(statement) and not modules:
            yield from _unmatched_modules(spec, statement, module_names, module_classes)
        if not _acts_on_params(statement):
            continue
        # An exclude or a 'none' that reaches no parameter but removes a module's activity term does something.
        if not matched and with_activity.intersection(modules) and not _sets_param_terms(statement):
            continue
        is_exclude = isinstance(statement, Exclude)
        code = "RD201" if is_exclude else "RD101"
        what = "exclude" if is_exclude else "rule"
        found_part = False
        for atom in statement.selector.atoms:
            if isinstance(atom, LayerAtom):
                for pattern in atom.patterns:
                    regex = glob_regex(pattern.text)
                    if not any(regex.fullmatch(p) for p in all_paths):
                        found_part = True
                        empty = [m for m in table.module_names if m and regex.fullmatch(m)]
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"layer pattern '{pattern.text}' matches only modules with no parameters: {name_list(empty)}"
                            if empty
                            else f"layer pattern '{pattern.text}' matches no parameter or module"
                            + _nearest(pattern.text, all_paths),
                        )
            elif isinstance(atom, TypeAtom):
                for pattern in atom.patterns:
                    regex = glob_regex(pattern.text)
                    if not any(regex.fullmatch(c) for c in all_classes):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code if is_exclude else "RD102",
                            f"type '{pattern.text}' matches no module class in the model"
                            + _nearest(pattern.text, all_classes),
                        )
                    elif not any(regex.fullmatch(c) for c in owner_classes):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"type '{pattern.text}' matches only modules that own no parameters directly",
                        )
            elif not any(atom_matches(atom, e) for e in table.entries):
                found_part = True
                yield model_diagnostic(spec, atom.pos, code, f"no parameter in the model is selected by '{atom.kind}'")
        if not matched and not found_part:
            yield model_diagnostic(
                spec, statement.selector.pos, code,
                f"{what} selects no parameter: each part matches something, but never all at once",
            )


def _acts_on_params(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Exclude) or any(t.kind not in MODULE_TERMS for t in statement.terms)


def _sets_param_terms(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Rule) and any(t.kind in PARAM_TERMS for t in statement.terms)


def _acts_on_modules(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Rule) and any(t.kind in MODULE_TERMS for t in statement.terms)


def _unmatched_modules(
    spec: Spec, statement: Rule, module_names: list[str], module_classes: list[str]
) -> Iterable[Diagnostic]:
    """RD101/RD102 for activity terms, which select modules: name and class patterns are read as modules'."""
    found_part = False
    for atom in statement.selector.atoms:
        for pattern in getattr(atom, "patterns", ()):
            regex = glob_regex(pattern.text)
            if isinstance(atom, LayerAtom) and not any(regex.fullmatch(n) for n in module_names):
                found_part = True
                yield model_diagnostic(
                    spec, pattern.pos, "RD101",
                    f"layer pattern '{pattern.text}' matches no module (activity terms select modules by their own name)"
                    + _nearest(pattern.text, module_names),
                )
            elif isinstance(atom, TypeAtom) and not any(regex.fullmatch(c) for c in module_classes):
                found_part = True
                yield model_diagnostic(
                    spec, pattern.pos, "RD102",
                    f"type '{pattern.text}' matches no module class in the model" + _nearest(pattern.text, module_classes),
                )
    if not found_part:
        kinds = ", ".join(f"'{kind_label(t.kind)}'" for t in statement.terms if t.kind in MODULE_TERMS)
        yield model_diagnostic(
            spec, statement.selector.pos, "RD101",
            f"rule selects no module for {kinds}: 'all' means modules without submodules, 'layer' a module's own name",
        )


def _nearest(text: str, names: Iterable[str], limit: int = 3) -> str:
    # difflib's ranking, with ties broken alphabetically (get_close_matches reverses them).
    scored = []
    for name in names:
        matcher = difflib.SequenceMatcher(None, text, name)
        if matcher.real_quick_ratio() >= 0.5 and matcher.quick_ratio() >= 0.5 and (ratio := matcher.ratio()) >= 0.5:
            scored.append((-ratio, name))
    close = [name for _, name in sorted(scored)[:limit]]
    return f"; nearest: {', '.join(repr(c) for c in close)}" if close else ""


# ---------------------------------------------------------------- RD202


def _only_frozen(res: Resolution) -> Iterable[Diagnostic]:
    for statement, matched in zip(res.spec.statements, res.matches):
        if (
            isinstance(statement, Rule)
            and _acts_on_params(statement)
            and matched
            and not any(res.table.entries[i].trainable for i in matched)
        ):
            yield model_diagnostic(
                res.spec, statement.selector.pos, "RD202",
                f"rule matches only frozen parameters (requires_grad=False): "
                f"{name_list([res.table.entries[i].name for i in matched])}",
            )


# ---------------------------------------------------------------- RD103


def _dead_rules(res: Resolution) -> Iterable[Diagnostic]:
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
        if not isinstance(statement, Rule) or not trainable[index] or not _acts_on_params(statement):
            continue
        if _acts_on_modules(statement):
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


# ---------------------------------------------------------------- RD203


def _alias_view(entry: ParamEntry, k: int) -> ParamEntry:
    return ParamEntry(index=entry.index, param=entry.param, names=(entry.names[k],), owners=(entry.owners[k],))


def _selector_matches(selector: Selector, entry: ParamEntry) -> bool:
    return all(atom_matches(atom, entry) for atom in selector.atoms)


def _tied_aliases(res: Resolution) -> Iterable[Diagnostic]:
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


# ---------------------------------------------------------------- RD204


def _decay_and_l2(res: Resolution) -> Iterable[Diagnostic]:
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
