"""RD101, RD102, RD201, RD202: selectors that reach nothing, or only frozen parameters.

Each pattern, class pattern and atom is judged once per table (the answers come
from :mod:`regdsl.matching`, which selection already filled), so a file of
50,000 statements costs one cached lookup per part of each statement. Only a
part that matches nothing pays for the names it could have meant.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .errors import Diagnostic, name_list, quoted
from .findings import model_diagnostic
from .resolution import Resolution
from .spec import MODULE_TERMS, PARAM_TERMS, Exclude, LayerAtom, Rule, Spec, TypeAtom, kind_label
from .walk import WRAPPER_SEGMENTS


def unmatched(res: Resolution) -> Iterable[Diagnostic]:
    # A 'type' pattern that matches nothing is the same problem for the rule's parameter terms and its
    # activity terms: said once.
    seen: set[tuple[int, int, str, str]] = set()
    for d in _unmatched(res):
        if (key := (d.line, d.column, d.code, d.message)) not in seen:
            seen.add(key)
            yield d


def _unmatched(res: Resolution) -> Iterable[Diagnostic]:
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
                        meant = _in_regdsl_names(pattern.text, matcher.layer)
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"layer pattern '{quoted(pattern.text)}' matches only modules with no parameters: {name_list(empty)}"
                            if empty
                            else f"layer pattern '{quoted(pattern.text)}' matches no parameter or module"
                            + (meant or nearest(pattern.text, matcher.all_paths)),
                        )
            elif isinstance(atom, TypeAtom):
                for pattern in atom.patterns:
                    if not matcher.type_hits(pattern.text, "all"):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code if is_exclude else "RD102",
                            f"type '{quoted(pattern.text)}' matches no module class in the model"
                            + nearest(pattern.text, matcher.all_classes),
                        )
                    elif not matcher.type_hits(pattern.text, "owners"):
                        found_part = True
                        yield model_diagnostic(
                            spec, pattern.pos, code,
                            f"type '{quoted(pattern.text)}' matches only modules that own no parameters directly",
                        )
            elif not matcher.atom(atom):
                found_part = True
                yield model_diagnostic(spec, atom.pos, code, f"no parameter in the model is selected by '{atom.kind}'")
        if not matched and not found_part:
            yield model_diagnostic(
                spec, statement.selector.pos, code,
                f"{what} selects no parameter: each part matches something, but never all at once",
            )


def _in_regdsl_names(text: str, matches: Any, what: str = "tensors") -> str | None:
    """What a pattern written in torch's names (a ``named_parameters()`` or state_dict key) is in
    regdsl's, when that matches: wrapper segments left out, and a parametrization's container
    (``fc1.parametrizations.weight.original0`` is ``fc1.weight.original0``). Difflib's nearest names
    miss these: the container moves the rest of the name."""
    parts = text.split(".")
    wrappers = sorted({p for p in parts if p in WRAPPER_SEGMENTS})
    container = "parametrizations" in parts[:-1]
    last = len(parts) - 1
    kept = [p for i, p in enumerate(parts) if p not in WRAPPER_SEGMENTS and (p != "parametrizations" or i == last)]
    if len(kept) == len(parts) or not kept or not matches(meant := ".".join(kept)):
        return None
    why = []
    if container:
        why.append("a parametrization's tensors under the tensor they compute, without torch's 'parametrizations' segment")
    if wrappers:
        why.append(f"{what} without wrapper segments ({', '.join(repr(w) for w in wrappers)})")
    return f": regdsl names {' and '.join(why)}: write '{quoted(meant)}'"


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
                    f"layer pattern '{quoted(pattern.text)}' matches no module (activity terms select modules by their own name)"
                    + (_in_regdsl_names(pattern.text, matcher.module_layer_hits, "modules")
                       or nearest(pattern.text, matcher.module_names)),
                )
            elif isinstance(atom, TypeAtom) and not matcher.type_hits(pattern.text, "modules"):
                found_part = True
                yield model_diagnostic(
                    spec, pattern.pos, "RD102",
                    f"type '{quoted(pattern.text)}' matches no module class in the model"
                    + nearest(pattern.text, matcher.module_classes),
                )
    if not found_part:
        kinds = ", ".join(f"'{kind_label(t.kind)}'" for t in statement.terms if t.kind in MODULE_TERMS)
        yield model_diagnostic(
            spec, statement.selector.pos, "RD101",
            f"rule selects no module for {kinds}: 'all' means modules without submodules, 'layer' a module's own name",
        )


class _Nearest:
    """The names a pattern that matches nothing could have meant: difflib's ranking (``ratio()`` of a
    SequenceMatcher, at least 0.5, ties alphabetical), each pattern worked out once.

    A file written for another version of a model can miss with thousands of distinct patterns, and
    a SequenceMatcher per pattern and name made that hours. ``quick_ratio()`` bounds ``ratio()`` from
    above and needs only character counts, so it is computed for all names at once (a count matrix);
    exact ratios are then taken best bound first, only until no remaining bound can reach the third best.
    """

    def __init__(self) -> None:
        self._done: dict[tuple[str, int], str] = {}
        self._counts: dict[int, tuple[Sequence[str], dict[str, int], Any, Any]] = {}

    def __call__(self, text: str, names: Sequence[str], limit: int = 3) -> str:
        key = (text, id(names))
        if key not in self._done:
            self._done[key] = self._nearest(text, names, limit)
        return self._done[key]

    def _matrix(self, names: Sequence[str]) -> tuple[Sequence[str], dict[str, int], Any, Any]:
        found = self._counts.get(id(names))
        if found is None or found[0] is not names:
            import torch

            alphabet = {c: k for k, c in enumerate(sorted({c for name in names for c in name}))}
            width = max(len(alphabet), 1)
            flat = [0] * (len(names) * width)
            for row, name in enumerate(names):
                for c, n in Counter(name).items():
                    flat[row * width + alphabet[c]] = n
            counts = torch.tensor(flat, dtype=torch.int32).view(len(names), width)
            lengths = torch.tensor([len(name) for name in names], dtype=torch.int64)
            found = self._counts[id(names)] = (names, alphabet, counts, lengths)
        return found

    def _nearest(self, text: str, names: Sequence[str], limit: int) -> str:
        if not names:
            return ""
        import torch

        _, alphabet, counts, lengths = self._matrix(names)
        wanted = torch.zeros(counts.shape[1], dtype=torch.int32)
        for c, n in Counter(text).items():
            if c in alphabet:
                wanted[alphabet[c]] = n
        # quick_ratio(): twice the characters the two have in common, over both lengths; in float64,
        # as difflib computes it (no name and a non-empty pattern leave no length at zero).
        common = torch.minimum(counts, wanted).sum(dim=1).to(torch.float64)
        bounds = 2.0 * common / (lengths + len(text)).to(torch.float64)
        order = torch.sort(bounds, descending=True, stable=True).indices
        order = order[bounds[order] >= 0.5]
        best: list[tuple[float, str]] = []  # (-ratio, name), the closest first
        for bound, k in zip(bounds[order].tolist(), order.tolist()):
            if len(best) == limit and bound < -best[-1][0]:
                break  # every name left is bounded below the third best
            name = names[k]
            matcher = difflib.SequenceMatcher(None, text, name)
            if matcher.real_quick_ratio() >= 0.5 and (ratio := matcher.ratio()) >= 0.5:
                best = sorted([*best, (-ratio, name)])[:limit]
        close = [name for _, name in best]
        return f"; nearest: {', '.join(repr(c) for c in close)}" if close else ""


def only_frozen(res: Resolution) -> Iterable[Diagnostic]:
    entries = res.table.entries
    for statement, matched, trainable in zip(res.spec.statements, res.matches, res.trainable_of()):
        # A depth counts on frozen parameters too: it decides the deepest depth (regdsl.depth).
        only_depth = isinstance(statement, Rule) and all(t.kind in ("depth", *MODULE_TERMS) for t in statement.terms)
        if isinstance(statement, Rule) and matched and not trainable and acts_on_params(statement) and not only_depth:
            yield model_diagnostic(
                res.spec, statement.selector.pos, "RD202",
                f"rule matches only frozen parameters (requires_grad=False): "
                f"{name_list([entries[i].name for i in matched])}",
            )
