"""RD101, RD102, RD201, RD202: selectors that reach nothing, or only frozen parameters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from .errors import Diagnostic, model_diagnostic, name_list
from .resolution import Resolution
from .select import atom_matches, glob_regex, module_class, type_names
from .spec import MODULE_TERMS, PARAM_TERMS, Exclude, LayerAtom, Rule, Spec, TypeAtom, kind_label


def unmatched(res: Resolution) -> Iterable[Diagnostic]:
    spec, table = res.spec, res.table
    all_paths = sorted({p for e in table.entries for p in e.paths})
    # A class and its module base classes: 'type Linear' matches a subclass of Linear (select.py).
    all_classes = sorted({n for m in table.module_names.values() for n in type_names(module_class(m))})
    owner_classes = {n for e in table.entries for n in e.owner_class_names}
    module_names = [name for name, _ in table.modules]
    module_classes = sorted({n for _, m in table.modules for n in type_names(module_class(m))})
    with_activity = {m.name for m in res.modules}
    for statement, matched, modules in zip(spec.statements, res.matches, res.module_matches):
        if acts_on_modules(statement) and not modules:
            yield from _unmatched_modules(spec, statement, module_names, module_classes)
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


def acts_on_params(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Exclude) or any(t.kind not in MODULE_TERMS for t in statement.terms)


def _sets_param_terms(statement: Rule | Exclude) -> bool:
    return isinstance(statement, Rule) and any(t.kind in PARAM_TERMS for t in statement.terms)


def acts_on_modules(statement: Rule | Exclude) -> bool:
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



def only_frozen(res: Resolution) -> Iterable[Diagnostic]:
    for statement, matched in zip(res.spec.statements, res.matches):
        if (
            isinstance(statement, Rule)
            and acts_on_params(statement)
            and matched
            and not any(res.table.entries[i].trainable for i in matched)
        ):
            yield model_diagnostic(
                res.spec, statement.selector.pos, "RD202",
                f"rule matches only frozen parameters (requires_grad=False): "
                f"{name_list([res.table.entries[i].name for i in matched])}",
            )

