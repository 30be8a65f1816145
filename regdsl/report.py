"""What a rule file does, as text tables, JSON-ready records and CSV, for terminals, logs and CI."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import Diagnostic
from .printer import format_number
from .spec import VALUE_TERMS

if TYPE_CHECKING:  # pragma: no cover - the real import would load torch for `regdsl check FILE`
    from .compiler import Coverage, GroupSummary, ParamRow


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    # Names are never cut: each column is as wide as its longest cell, numbers right-aligned.
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "lazy"  # an uninitialized lazy parameter has no shape yet
    return "x".join(map(str, shape)) or "scalar"


def _set_by(row: ParamRow) -> str:
    if not row.trainable:
        return "frozen"
    if row.excluded_by:
        return f"excluded:{row.excluded_by.pos.line if row.excluded_by.pos else '?'}"
    if not row.terms:
        # Say whether a 'none' cleared it or no rule reached it at all.
        return f"none:{row.cleared_by.pos.line if row.cleared_by.pos else '?'}" if row.cleared_by else "-"
    return " ".join(f"{kind}:{s.pos.line if s.pos else '?'}" for kind, s in row.terms.items())


def format_explain(rows: Sequence[ParamRow]) -> str:
    """One aligned line per parameter: name, aliases, shape, numel, each term's value, and
    ``set by``: which rule line set each term (``decay:3 l2:6``), or ``excluded:4``, or ``frozen``."""
    with_aliases = any(r.aliases for r in rows)
    header = ["parameter", *(["aliases"] if with_aliases else []), "shape", "numel", *VALUE_TERMS, "set by (line)"]
    body = []
    for row in rows:
        values = [format_number(row.terms[k].value) if k in row.terms else "-" for k in VALUE_TERMS]
        aliases = [", ".join(row.aliases)] if with_aliases else []
        body.append([row.name, *aliases, _shape(row.shape), f"{row.numel:,}", *values, _set_by(row)])
    numel_column = header.index("numel")
    return _table(header, body, right=[numel_column])


def explain_records(rows: Sequence[ParamRow]) -> list[dict[str, Any]]:
    """JSON-ready rows: every field of :class:`ParamRow`, positions as ``{"file", "line", "column"}``."""

    def where(setting: Any) -> dict[str, Any] | None:
        if setting is None:
            return None
        pos = setting.pos
        return {"file": setting.origin, "line": pos.line if pos else None, "column": pos.column if pos else None}

    return [
        {
            "name": row.name,
            "aliases": list(row.aliases),
            "shape": list(row.shape) if row.shape is not None else None,
            "numel": row.numel,
            "trainable": row.trainable,
            "excluded_by": where(row.excluded_by),
            "cleared_by": where(row.cleared_by),
            "terms": {kind: {"value": s.value, **(where(s) or {})} for kind, s in row.terms.items()},
        }
        for row in rows
    ]


def explain_csv(rows: Sequence[ParamRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["name", "aliases", "shape", "numel", "trainable", "excluded_by_line"]
        + [c for k in VALUE_TERMS for c in (k, f"{k}_line")]
    )
    for row in rows:
        cells = [
            row.name,
            ";".join(row.aliases),
            _shape(row.shape),
            row.numel,
            row.trainable,
            row.excluded_by.pos.line if row.excluded_by and row.excluded_by.pos else "",
        ]
        for kind in VALUE_TERMS:
            setting = row.terms.get(kind)
            cells += [setting.value, setting.pos.line if setting.pos else ""] if setting else ["", ""]
        writer.writerow(cells)
    return out.getvalue()


def format_groups(groups: Sequence[GroupSummary]) -> str:
    body = [[g.name, f"{g.weight_decay:g}", str(len(g.params)), f"{g.numel:,}"] for g in groups]
    return _table(["group", "weight_decay", "tensors", "elements"], body, right=[2, 3])


def group_records(groups: Sequence[GroupSummary]) -> list[dict[str, Any]]:
    return [
        {"name": g.name, "weight_decay": g.weight_decay, "tensors": len(g.params), "elements": g.numel, "params": list(g.params)}
        for g in groups
    ]


def groups_csv(groups: Sequence[GroupSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "weight_decay", "tensors", "elements"])
    for g in groups:
        writer.writerow([g.name, g.weight_decay, len(g.params), g.numel])
    return out.getvalue()


# ---------------------------------------------------------------- coverage


def coverage_record(coverage: Coverage) -> dict[str, Any]:
    def count(c: Any) -> dict[str, int]:
        return {"tensors": c.tensors, "elements": c.elements}

    return {
        "terms": {k: count(c) for k, c in coverage.terms.items()},
        "nothing": count(coverage.nothing),
        "excluded": count(coverage.excluded),
        "frozen": count(coverage.frozen),
    }


def format_coverage(coverage: Coverage) -> str:
    lines = [(k, c) for k, c in coverage.terms.items()]
    lines += [("nothing", coverage.nothing), ("  excluded", coverage.excluded), ("frozen", coverage.frozen)]
    body = [[label, f"{c.tensors:,}", "tensor" if c.tensors == 1 else "tensors", f"{c.elements:,}", "elements"] for label, c in lines]
    widths = [max(len(r[i]) for r in body) for i in range(5)]
    return "\n".join(
        f"  {r[0].ljust(widths[0])}  {r[1].rjust(widths[1])} {r[2].ljust(widths[2])}  {r[3].rjust(widths[3])} {r[4]}"
        for r in body
    )


# ---------------------------------------------------------------- diagnostics

def format_diagnostic(d: Diagnostic, color: bool = False) -> str:
    """``path:line:col: severity: CODE message``, the source line and a caret; ANSI colour on request."""
    return d.render(color)


def diagnostic_record(d: Diagnostic) -> dict[str, Any]:
    return {
        "code": d.code,
        "severity": d.severity,
        "file": d.file,
        "line": d.line,
        "column": d.column,
        "end_line": d.end_line if d.end_line is not None else d.line,
        "end_column": d.end_column if d.end_column is not None else d.column + 1,
        "message": d.message,
    }


def github_annotation(d: Diagnostic) -> str:
    """A GitHub Actions workflow command, escaped as the runner expects."""

    def data(s: str) -> str:
        return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    def prop(s: str) -> str:
        return data(s).replace(":", "%3A").replace(",", "%2C")

    record = diagnostic_record(d)
    props = (
        f"file={prop(d.file)},line={record['line']},col={record['column']},"
        f"endLine={record['end_line']},endColumn={record['end_column']},title={prop(d.code or 'regdsl')}"
    )
    return f"::{d.severity} {props}::{data(d.message)}"
