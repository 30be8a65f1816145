"""Model-level diagnostics: the one code path of ``regdsl.check`` and ``regdsl.compile``.

:func:`diagnose` collects everything a rule file does wrong against one model;
:func:`enforce` is how ``compile`` acts on it: any error-severity diagnostic
raises :class:`RegCompileError` before anything is built, and each warning is
issued as a :class:`RegDslWarning` carrying ``file:line:col``. ``check``
returns the same list, so the two cannot drift.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from itertools import compress, repeat
from operator import contains
from typing import Any

from . import sharded
from .classes import is_embedding_class
from .depth import depth_diagnostics
from .entries import ParamEntry, _uninitialized
from .errors import Diagnostic, RegCompileError, RegDslWarning, caller_stacklevel, name_list, shape_text
from .findings import model_diagnostic
from .gcpause import paused_gc
from .overrides import dead_rules, decay_and_l2, tied_aliases
from .references import reference_problems
from .resolution import Resolution, Setting
from .schedule import always_zero
from .select import is_embedding_module
from .spec import NOT_REGULARIZERS, Span, kind_label
from .unmatched import only_frozen, unmatched

# Stands for "no reference argument at all" (check without one), unlike compile's reference=None.
NOT_GIVEN: Any = object()


def diagnose(resolution: Resolution, reference: Mapping[str, Any] | None | object = NOT_GIVEN) -> list[Diagnostic]:
    """Every problem of the resolved spec against its model, sorted by position.

    ``reference`` is what ``compile`` was given for ``l2 ... to ref``; left out (as
    ``check`` without a reference does), references are not judged.
    """
    if empty := nothing_to_train(resolution):
        return empty  # every selector would also match nothing: one error says it all
    diagnostics: list[Diagnostic] = []
    with paused_gc():  # a long file can have as many diagnostics as lines
        diagnostics += unmatched(resolution)
        diagnostics += only_frozen(resolution)
        diagnostics += dead_rules(resolution)
        diagnostics += unusable_terms(resolution)
        diagnostics += tied_aliases(resolution)
        diagnostics += decay_and_l2(resolution)
        diagnostics += uncalled_modules(resolution)
        diagnostics += depth_diagnostics(resolution)
        if reference is not NOT_GIVEN:
            diagnostics += reference_problems(resolution, reference)  # type: ignore[arg-type]
    return sorted(diagnostics, key=Diagnostic.sort_key)


def enforce(diagnostics: list[Diagnostic]) -> None:
    """Raise on errors; issue warnings as :class:`RegDslWarning` (``file:line:col`` in each message)."""
    errors = [d for d in diagnostics if d.severity == "error"]
    if errors:
        raise RegCompileError(errors)
    for d in diagnostics:
        warnings.warn(RegDslWarning(d.render()), stacklevel=caller_stacklevel())


def nothing_to_train(resolution: Resolution) -> list[Diagnostic]:
    """RD107: an optimizer built from no parameter fails later, far from the cause."""
    entries = resolution.table.entries
    if any(resolution.table.trainable):
        return []
    why = (
        "the model has no parameters"
        if not entries
        else f"all {len(entries)} of its parameter tensors are frozen (requires_grad=False)"
    )
    statements = resolution.spec.statements
    # An empty file still gets a position, so the message reads like every other diagnostic.
    pos = statements[0].pos if statements else Span(line=1, column=1, end_line=1, end_column=1)
    return [model_diagnostic(resolution.spec, pos, "RD107", f"nothing to train: {why}")]


# Kinds that need the parameter's shape, so an uninitialized lazy parameter cannot take them.
_SHAPED = ("l1", "l2", "group_lasso", "orthogonal", "max_norm")


def _why_unusable(entry: ParamEntry, kind: str, term: Any) -> str | None:
    """Why ``kind`` cannot work on this entry, or None; the shape and dtype decide unless the entry is odd."""
    if any("_flat_param" in name.split(".") for name in entry.names):
        return "FSDP's flattened parameter takes no per-parameter rules; wrap with FSDP(use_orig_params=True)"
    if sharded.is_sharded(entry.param) and (problem := sharded.unsupported(entry.param)):
        return problem
    if not entry.initialized:
        if kind in _SHAPED:
            return "a lazy module's parameters have no shape until its first forward pass; run one before compiling"
        return None
    if kind == "decay" and any(getattr(o, "sparse", False) for o in entry.owners if is_embedding_module(o)):
        return "an embedding with sparse=True gets sparse gradients, and torch optimizers cannot decay them"
    shape = tuple(entry.param.shape)
    if kind == "orthogonal" and len(shape) < 2:
        return f"it needs a weight with 2 or more dimensions, and the shape is {shape_text(shape)}"
    if kind in ("group_lasso", "max_norm") and not -len(shape) <= term.dim < max(len(shape), 0):
        return f"dim={term.dim} is out of range for shape {shape_text(shape)}"
    complex_ok = kind in ("decay", "l2") or (kind == "l1" and not term.prox)
    if entry.param.is_complex() and not complex_ok:
        return "complex parameters take only decay, l1 and l2 (through the loss)"
    return None


def _always_usable(kind: str, term: Any) -> bool:
    # On an entry that is not odd (see _odd_entries) these fail for no shape and no dtype.
    return kind in ("decay", "l2") or (kind == "l1" and not term.prox)


def _odd_entries(table: Any) -> set[int]:
    """Entries where more than shape, dtype and kind can make a term unusable: FSDP's flat parameter,
    a lazy parameter, a DTensor, a parameter of an embedding (sparse gradients). Found a whole column at a time."""
    entries, params = table.entries, table.params
    odd = {i for (types, _), members in table.kinds.items() if any(map(is_embedding_class, types)) for i in members}
    param_types = set(map(type, params))
    # Lazy parameters (no shape yet) and DTensors (their placements decide).
    unusual = {t for t in param_types if _uninitialized(t) or sharded.is_sharded_type(t)}
    if unusual:
        odd.update(compress(range(len(entries)), map(unusual.__contains__, map(type, params))))
    names = table.matcher.names
    if "_flat_param" in "\n".join(names):  # one C-level search first: nearly every model has none
        odd.update(compress(range(len(entries)), map(contains, names, repeat("_flat_param"))))
    odd.update(i for i in table.tied if any("_flat_param" in name for name in entries[i].names))
    return odd


def unusable_terms(resolution: Resolution) -> list[Diagnostic]:
    """Terms the file sets that cannot work on their parameter (RD104), one diagnostic per rule and cause."""
    found: dict[tuple[Setting, str, str], list[str]] = {}
    rows, entries = resolution.rows, resolution.table.entries
    # By outcome: the terms to judge (a zero term does nothing, so it cannot fail either), and
    # whether only odd entries can fail them.
    todo: dict[int, tuple[list[tuple[str, Setting]], bool]] = {}
    for outcome, i in resolution.representatives().items():
        terms = [(k, s) for k, s in rows[i].terms.items() if k not in NOT_REGULARIZERS and not always_zero(s.term)]
        if terms:
            todo[outcome] = (terms, all(_always_usable(k, s.term) for k, s in terms))
    if not todo:
        return []
    odd = _odd_entries(resolution.table)
    outcomes = resolution.outcome_of()
    judged = list(resolution.entries_with({o for o, (_, only_odd) in todo.items() if not only_odd}))
    also = [i for i in odd if outcomes[i] in todo and todo[outcomes[i]][1]]
    reasons: dict[tuple[Any, ...], str | None] = {}  # what decides for an entry that is not odd
    for i in sorted(judged + also) if also else judged:
        entry, row = entries[i], rows[i]
        for kind, setting in todo[outcomes[i]][0]:
            if i in odd:
                reason = _why_unusable(entry, kind, setting.term)
            else:
                key = (kind, id(setting), row.shape, entry.param.is_complex())
                if key not in reasons:
                    reasons[key] = _why_unusable(entry, kind, setting.term)
                reason = reasons[key]
            if reason:
                found.setdefault((setting, kind, reason), []).append(row.name)
    return [
        model_diagnostic(resolution.spec, setting.pos, "RD104", f"'{kind}' cannot take effect on {name_list(names)}: {reason}")
        for (setting, kind, reason), names in found.items()
    ]


def uncalled_modules(resolution: Resolution) -> list[Diagnostic]:
    """RD205: activity terms on a module whose parent uses its weights without calling it, so its
    forward hook never runs: ``nn.MultiheadAttention``'s ``out_proj`` (and every
    ``nn.Transformer*`` layer's, which hold one)."""
    if not resolution.modules:
        return []
    by_name = resolution.table.modules_by_name
    found: dict[int, tuple[Setting, list[str]]] = {}
    for row in resolution.modules:
        parent, _, attribute = row.name.rpartition(".")
        if attribute != "out_proj" or not _is_torch_attention(by_name.get(parent)):
            continue
        for setting in row.terms.values():
            if not always_zero(setting.term):
                found.setdefault(id(setting), (setting, []))[1].append(row.name)
    return [
        model_diagnostic(
            resolution.spec, setting.pos, "RD205",
            f"'{kind_label(setting.term.kind)}' on {name_list(names)} collects nothing: nn.MultiheadAttention "
            "computes its output from out_proj's weights without calling out_proj, so no forward hook runs; "
            "put the term on the module that contains the attention",
        )
        for setting, names in found.values()
    ]  # fmt: skip


def _is_torch_attention(module: Any) -> bool:
    # By name, so that check without a model never imports torch.
    return module is not None and any(
        c.__name__ == "MultiheadAttention" and c.__module__.startswith("torch.nn") for c in type(module).__mro__
    )
