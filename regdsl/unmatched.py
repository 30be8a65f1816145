"""RD101, RD102, RD201, RD202: selectors that reach nothing, or only frozen parameters.

Each pattern, class pattern and atom is judged once per table (the answers come
from :mod:`regdsl.matching`, which selection already filled), so a file of
50,000 statements costs one cached lookup per part of each statement. Only a
part that matches nothing pays for the names it could have meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from .errors import Diagnostic, name_list
from .findings import model_diagnostic
from .resolution import Resolution
from .spec import MODULE_TERMS, PARAM_TERMS, Exclude, LayerAtom, Rule, Spec, TypeAtom, kind_label


def unmatched(res: Resolution) -> Iterable[Diagnostic]:
    spec, table = res.spec, res.table
    matcher = table.matcher
    nearest = _Nearest()
    with_activity = {m.name for m in res.modules}
    for statement, matched, modules in zip(spec.statements, res.matches, res.module_matches):
        if acts_on_modules(statement) and not modules:
            yield from _unmatched_modules(spec, statement, res, nearest)
        if not acts_on_params(statement):
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
                    if not matcher.layer(pattern.text):
                        found_part = True
                        empty = matcher.modules_named(pattern.text)
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"layer pattern '{pattern.text}' matches only modules with no parameters: {name_list(empty)}"
                            if empty
                            else f"layer pattern '{pattern.text}' matches no parameter or module"
                            + nearest(pattern.text, matcher.all_paths),
                        )
            elif isinstance(atom, TypeAtom):
                for pattern in atom.patterns:
                    if not matcher.type_hits(pattern.text, "all"):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code if is_exclude else "RD102",
                            f"type '{pattern.text}' matches no module class in the model"
                            + nearest(pattern.text, matcher.all_classes),
                        )
                    elif not matcher.type_hits(pattern.text, "owners"):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"type '{pattern.text}' matches only modules that own no parameters directly",
                        )
            elif not matcher.atom(atom):
                found_part = True
                yield model_diagnostic(spec, atom.pos, code, f"no parameter in the model is selected by '{atom.kind}'")
        if not matched and not found_part:
            yield model_diagnostic(
                spec, statement.selector.pos, code,
                f"{what} selects no parameter: each part matches something, but never all at once",
            )


def acts_on_params(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Exclude) or any(t.kind not in MODULE_TERMS for t in statement.terms)


def _sets_param_terms(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Rule) and any(t.kind in PARAM_TERMS for t in statement.terms)


def acts_on_modules(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Rule) and any(t.kind in MODULE_TERMS for t in statement.terms)


def _unmatched_modules(spec: Spec, statement: Rule, res: Resolution, nearest: _Nearest) -> Iterable[Diagnostic]:
    """RD101/RD102 for activity terms, which select modules: name and class patterns are read as modules'."""
    matcher = res.table.matcher
    found_part = False
    for atom in statement.selector.atoms:
        for pattern in getattr(atom, "patterns", ()):
            if isinstance(atom, LayerAtom) and not matcher.module_layer_hits(pattern.text):
                found_part = True
                yield model_diagnostic(
                    spec, pattern.pos, "RD101",
                    f"layer pattern '{pattern.text}' matches no module (activity terms select modules by their own name)"
                    + nearest(pattern.text, matcher.module_names),
                )
            elif isinstance(atom, TypeAtom) and not matcher.type_hits(pattern.text, "modules"):
                found_part = True
                yield model_diagnostic(
                    spec, pattern.pos, "RD102",
                    f"type '{pattern.text}' matches no module class in the model"
                    + nearest(pattern.text, matcher.module_classes),
                )
    if not found_part:
        kinds = ", ".join(f"'{kind_label(t.kind)}'" for t in statement.terms if t.kind in MODULE_TERMS)
        yield model_diagnostic(
            spec, statement.selector.pos, "RD101",
            f"rule selects no module for {kinds}: 'all' means modules without submodules, 'layer' a module's own name",
        )


class _Nearest:
    """The names a pattern that matches nothing could have meant, each pattern worked out once."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, int], str] = {}

    def __call__(self, text: str, names: Sequence[str], limit: int = 3) -> str:
        key = (text, id(names))
        if key not in self._done:
            self._done[key] = _nearest(text, names, limit)
        return self._done[key]


def _nearest(text: str, names: Iterable[str], limit: int = 3) -> str:
    # difflib's ranking, with ties broken alphabetically (get_close_matches reverses them).
    scored = []
    size = len(text)
    for name in names:
        # real_quick_ratio() from the lengths alone, before a SequenceMatcher is built for the name.
        if 2 * min(size, len(name)) < 0.5 * (size + len(name)):
            continue
        matcher = difflib.SequenceMatcher(None, text, name)
        if matcher.real_quick_ratio() >= 0.5 and matcher.quick_ratio() >= 0.5 and (ratio := matcher.ratio()) >= 0.5:
            scored.append((-ratio, name))
    close = [name for _, name in sorted(scored)[:limit]]
    return f"; nearest: {', '.join(repr(c) for c in close)}" if close else ""


def only_frozen(res: Resolution) -> Iterable[Diagnostic]:
    entries = res.table.entries
    for statement, matched, trainable in zip(res.spec.statements, res.matches, res.trainable_of()):
        if isinstance(statement, Rule) and matched and not trainable and acts_on_params(statement):
            yield model_diagnostic(
                res.spec, statement.selector.pos, "RD202",
                f"rule matches only frozen parameters (requires_grad=False): "
                f"{name_list([entries[i].name for i in matched])}",
            )
