"""Plain-text tables of what a compiled rule file does, for terminals and logs."""

from __future__ import annotations

from collections.abc import Sequence

from .compiler import GroupSummary, ParamRow
from .spec import VALUE_TERMS


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    # Names are never truncated: columns widen to the longest cell instead.
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_explain(rows: Sequence[ParamRow]) -> str:
    """One line per parameter: name, shape, each term's value and the ``file:line`` that set it."""
    body = []
    for row in rows:
        if not row.trainable:
            cells = ["frozen"] + [""] * (len(VALUE_TERMS) - 1)
        elif row.excluded_by:
            cells = [f"excluded ({row.excluded_by.where})"] + [""] * (len(VALUE_TERMS) - 1)
        else:
            cells = [f"{row.terms[k].value:g} ({row.terms[k].where})" if k in row.terms else "-" for k in VALUE_TERMS]
        name = row.name + (f" (= {', '.join(row.aliases)})" if row.aliases else "")
        body.append([name, "x".join(map(str, row.shape)) or "scalar", *cells])
    return _table(["parameter", "shape", *VALUE_TERMS], body)


def format_groups(groups: Sequence[GroupSummary]) -> str:
    body = [[g.name, f"{g.weight_decay:g}", str(len(g.params)), str(g.numel)] for g in groups]
    return _table(["group", "weight_decay", "tensors", "elements"], body)
