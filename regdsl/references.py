"""References for ``l2 ... to ref``: any state_dict-like mapping, read like the model's names.

A reference is whatever users save: ``model.state_dict()``, a DDP or
``torch.compile`` checkpoint (``module.``/``_orig_mod.`` prefixes),
``AveragedModel(model).state_dict()`` (``module.`` plus an ``n_averaged``
buffer). Keys are normalized as parameter names are; entries no rule asks for
(buffers, counters, other models' keys) are never looked at. What is looked at
must be a finite tensor of the parameter's shape, or compile refuses with RD105
naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import Diagnostic, name_list, shape_text
from .findings import model_diagnostic
from .resolution import Resolution, Setting
from .schedule import always_zero
from .select import ParamEntry, canonical_name

_WRAPPER_PREFIX = "module."  # DDP, DataParallel and AveragedModel keep the model as .module


def reference_index(reference: Mapping[Any, Any]) -> dict[str, tuple[str, Any]]:
    """Each reference entry under its parameter name, with the key as written.

    Wrapper segments are removed, and so are leading ``module.`` prefixes; the key as
    written wins where both readings exist (a model's own child may be called ``module``).
    """
    index: dict[str, tuple[str, Any]] = {}
    keys = [k for k in reference if isinstance(k, str)]
    for key in keys:
        index.setdefault(canonical_name(key), (key, reference[key]))
    for key in keys:
        stripped = key
        while stripped.startswith(_WRAPPER_PREFIX):
            stripped = stripped.removeprefix(_WRAPPER_PREFIX)
            index.setdefault(canonical_name(stripped), (key, reference[key]))
    return index


def find_reference(entry: ParamEntry, index: dict[str, tuple[str, Any]]) -> tuple[str, Any] | None:
    """The reference entry (key as written, value) under any of the tensor's names (a tied weight has several)."""
    return next((index[n] for n in entry.names if n in index), None)


def _value_problem(key: str, value: Any, param: torch.Tensor) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"the reference's '{key}' is a {type(value).__name__}, not a tensor, for"
    if tuple(value.shape) != tuple(param.shape):
        return (
            f"the reference's '{key}' has shape {shape_text(tuple(value.shape))}, the parameter "
            f"{shape_text(tuple(param.shape))}, for"
        )
    if value.is_complex() != param.is_complex() or not (value.is_floating_point() or value.is_complex()):
        # Copied into the parameter's dtype, a complex w0 would lose its imaginary part, an integer one its meaning.
        return f"the reference's '{key}' is a {value.dtype} tensor, the parameter {param.dtype}, for"
    if value.is_meta and not param.is_meta:
        return f"the reference's '{key}' is on the meta device: it holds no values to copy, for"
    # A NaN in w0 would make every step's penalty NaN; meta tensors hold no values to judge.
    if not value.is_meta and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        return f"the reference's '{key}' holds NaN or infinite values, for"
    return None


def reference_problems(resolution: Resolution, reference: Any) -> list[Diagnostic]:
    """RD105: what keeps ``l2 ... to ref`` from finding a usable ``w0`` in ``reference``."""
    found: dict[tuple[Setting, str], list[str]] = {}
    index: dict[str, tuple[str, Any]] | None = None
    # By outcome: the l2 toward the reference, if its rows have one; most files have none at all.
    rows, entries = resolution.rows, resolution.table.entries
    wanted: dict[int, Setting] = {}
    for outcome, i in resolution.representatives().items():
        setting = rows[i].terms.get("l2")
        if setting and setting.term.to == "ref" and not always_zero(setting.term):
            wanted[outcome] = setting
    outcomes = resolution.outcome_of()
    for i in resolution.entries_with(set(wanted)):
        entry, row, setting = entries[i], rows[i], wanted[outcomes[i]]
        if not entry.trainable:
            continue
        if index is None:  # only a rule that asks for the reference reads it
            index = reference_index(reference) if isinstance(reference, Mapping) else {}
        if reference is None:
            found.setdefault((setting, "no reference was given: compile with spec.compile(model, reference=state_dict)"), [])
            continue
        if not isinstance(reference, Mapping):
            what = type(reference).__name__
            hint = " (pass model.state_dict())" if isinstance(reference, torch.nn.Module) else ""
            found.setdefault(
                (setting, f"the reference must be a mapping of parameter names to tensors (a state_dict), not a {what}{hint}"),
                [],
            )
            continue
        hit = find_reference(entry, index)
        reason = "the reference has no entry for" if hit is None else _value_problem(*hit, entry.param)
        if reason:
            found.setdefault((setting, reason), []).append(row.name)
    return [
        model_diagnostic(
            resolution.spec, setting.pos, "RD105",
            f"'l2 ... to ref': {reason}" + (f" {name_list(names)}" if names else ""),
        )
        for (setting, reason), names in found.items()
    ]
