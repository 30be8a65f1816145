"""References for ``l2 ... to ref``: any state_dict-like mapping, read like the model's names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import Diagnostic, model_diagnostic, name_list, shape_text
from .resolution import Resolution, Setting
from .schedule import always_zero
from .select import ParamEntry, canonical_name


def reference_index(reference: Mapping[str, Any]) -> dict[str, Any]:
    """Reference keys as parameter names: wrapper segments removed, and DDP's ``module.`` when every
    key has it. The key as written wins where both readings exist (a model's own child may be
    called ``module``)."""
    index = {canonical_name(k): v for k, v in reference.items()}
    if index and all(k.startswith("module.") for k in reference):
        for key, value in reference.items():
            index.setdefault(canonical_name(key.removeprefix("module.")), value)
    return index


def find_reference(entry: ParamEntry, index: dict[str, Any]) -> Any:
    """The reference entry under any of the tensor's names (a tied weight has several)."""
    return next((index[n] for n in entry.names if n in index), None)


def reference_problems(resolution: Resolution, reference: Mapping[str, Any] | None) -> list[Diagnostic]:
    """RD105: what keeps ``l2 ... to ref`` from finding its ``w0`` in ``reference``."""
    found: dict[tuple[Setting, str], list[str]] = {}
    index = reference_index(reference) if reference is not None else {}
    for entry, row in zip(resolution.table.entries, resolution.rows):
        setting = row.terms.get("l2")
        if not entry.trainable or setting is None or setting.term.to != "ref" or always_zero(setting.term):
            continue
        if reference is None:
            found.setdefault((setting, "no reference was given: compile with spec.compile(model, reference=state_dict)"), [])
            continue
        value = find_reference(entry, index)
        if value is None:
            found.setdefault((setting, "the reference has no entry for"), []).append(row.name)
        elif tuple(value.shape) != tuple(entry.param.shape):
            found.setdefault(
                (
                    setting,
                    (f"the reference's shape {shape_text(tuple(value.shape))} differs from the parameter's "
                    f"{shape_text(tuple(entry.param.shape))} for"),
                ),
                [],
            ).append(row.name)
    return [
        model_diagnostic(
            resolution.spec, setting.pos, "RD105",
            f"'l2 ... to ref': {reason}" + (f" {name_list(names)}" if names else ""),
        )
        for (setting, reason), names in found.items()
    ]

