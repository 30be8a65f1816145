"""What a rule file does, as text tables, JSON-ready records and CSV, for terminals, logs and CI."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import Diagnostic
from .printer import format_term_value
from .spec import MODULE_TERMS, PARAM_TERMS, kind_label

if TYPE_CHECKING:  # pragma: no cover - the real import would load torch for `regdsl check FILE`
    from .resolution import Coverage, GroupSummary, ModuleRow, ParamRow

def module_label(name: str) -> str:
    """A module's name for people: the root module's name is empty."""
    return name or "(model)"


# Columns explain always shows; other kinds get a column only when some row has them.
_ALWAYS_SHOWN = ("decay", "l1", "l2")


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


def _set_by(row: ParamRow | ModuleRow, trainable: bool = True) -> str:
    if not trainable:
        return "frozen"
    terms = " ".join(f"{kind_label(kind)}:{s.pos.line if s.pos else '?'}" for kind, s in row.terms.items())
    if row.excluded_by:
        # lr_mult survives an exclude; say both.
        return f"excluded:{row.excluded_by.pos.line if row.excluded_by.pos else '?'}" + (f" {terms}" if terms else "")
    if not row.terms:
        # Say whether a 'none' cleared it or no rule reached it at all.
        return f"none:{row.cleared_by.pos.line if row.cleared_by.pos else '?'}" if row.cleared_by else "-"
    return terms


def _value(setting: Any) -> str:
    return format_term_value(setting.term) if setting.term is not None else repr(setting.value)


def format_explain(rows: Sequence[ParamRow], modules: Sequence[ModuleRow] = ()) -> str:
    """One aligned line per parameter: name, aliases, shape, numel, each term's value, and
    ``set by``: which rule line set each term (``decay:3 l2:6``), or ``excluded:4``, or ``frozen``.
    Modules with activity terms follow in a second table. A row's notes (a ``type`` matched through
    a base class, a parametrization's original) are numbered footnotes: ``decay:3 [1]``."""
    rows = _rows_of(rows, "ParamRow", "format_explain", "reg.explain() or regdsl.resolve(spec, model).rows")
    modules = _rows_of(modules, "ModuleRow", "format_explain", "its modules: reg.explain_modules()")
    numbers: dict[str, int] = {}
    for note in (n for r in [*rows, *modules] for n in r.notes):
        numbers.setdefault(note, len(numbers) + 1)

    def marked(cell: str, row: ParamRow | ModuleRow) -> str:
        # One footnote per distinct text: a model's 24 weight-normed layers share one note.
        return cell + "".join(f" [{numbers[n]}]" for n in row.notes)

    with_aliases = any(r.aliases for r in rows)
    with_depth = any(r.lr_factor is not None for r in rows)
    # With depths, the depth column is each parameter's number, not the rule's expression.
    kinds = [k for k in _shown_kinds(rows) if not (with_depth and k == "depth")]
    header = ["parameter", *(["aliases"] if with_aliases else []), "shape", "numel", *kinds]
    header += [*(["depth", "lr_factor"] if with_depth else []), "set by (line)"]
    body = []
    for row in rows:
        values = [_value(row.terms[k]) if k in row.terms else "-" for k in kinds]
        if with_depth:
            values += [str(row.depth), f"{row.lr_factor:g}"] if row.lr_factor is not None else ["-", "-"]
        aliases = [", ".join(row.aliases)] if with_aliases else []
        set_by = marked(_set_by(row, row.trainable), row)
        body.append([row.name, *aliases, _shape(row.shape), f"{row.numel:,}", *values, set_by])
    numel_column = header.index("numel")
    right = [numel_column, *([header.index("depth"), header.index("lr_factor")] if with_depth else [])]
    text = _table(header, body, right=right)
    if modules:
        module_body = [
            [
                module_label(m.name),
                m.class_name,
                *(_value(m.terms[k]) if k in m.terms else "-" for k in MODULE_TERMS),
                marked(_set_by(m), m),
            ]
            for m in modules
        ]
        text += "\n\n" + _table(["module output", "class", *map(kind_label, MODULE_TERMS), "set by (line)"], module_body)
    if numbers:
        text += "\n\nNotes:\n" + "\n".join(f"  [{number}] {note}" for note, number in numbers.items())
    return text


def _where(setting: Any) -> dict[str, Any] | None:
    if setting is None:
        return None
    pos = setting.pos
    return {"file": setting.origin, "line": pos.line if pos else None, "column": pos.column if pos else None}


def _term_records(terms: dict[str, Any]) -> dict[str, Any]:
    return {kind: {"value": s.value, "text": _value(s), **(_where(s) or {})} for kind, s in terms.items()}


def explain_records(rows: Sequence[ParamRow], modules: Sequence[ModuleRow] = ()) -> dict[str, Any]:
    """JSON-ready ``{"parameters": [...], "modules": [...]}``: every field of the rows,
    positions as ``{"file", "line", "column"}``, each term's value and its text (``0.01 prox``)."""
    rows = _rows_of(rows, "ParamRow", "explain_records", "reg.explain() or regdsl.resolve(spec, model).rows")
    modules = _rows_of(modules, "ModuleRow", "explain_records", "its modules: reg.explain_modules()")
    return {
        "parameters": [
            {
                "name": row.name,
                "aliases": list(row.aliases),
                "shape": list(row.shape) if row.shape is not None else None,
                "numel": row.numel,
                "trainable": row.trainable,
                "excluded_by": _where(row.excluded_by),
                "cleared_by": _where(row.cleared_by),
                "terms": _term_records(row.terms),
                **_notes_record(row),
                **_depth_record(row),
            }
            for row in rows
        ],
        "modules": [
            {
                "name": m.name,
                "class": m.class_name,
                "excluded_by": _where(m.excluded_by),
                "cleared_by": _where(m.cleared_by),
                "terms": _term_records(m.terms),
                **_notes_record(m),
            }
            for m in modules
        ],
    }


def _depth_record(row: ParamRow) -> dict[str, Any]:
    # Only files with lr_decay add the keys, as with notes.
    return {"depth": row.depth, "lr_factor": row.lr_factor} if row.lr_factor is not None else {}


def _notes_record(row: ParamRow | ModuleRow) -> dict[str, list[str]]:
    # Only rows with notes get the key: a record of a plain model stays what it always was.
    return {"notes": list(row.notes)} if row.notes else {}


def _shown_kinds(rows: Sequence[ParamRow]) -> list[str]:
    used = {k for r in rows for k in r.terms}
    return [k for k in PARAM_TERMS if k in _ALWAYS_SHOWN or k in used]


def explain_csv(rows: Sequence[ParamRow]) -> str:
    """One line per parameter. Each kind the file uses (decay, l1 and l2 always) has a value and
    a line column; ``details`` appears when a term has options or a schedule (``l1 0.01 prox``),
    ``notes`` when a row has notes (``ParamRow.notes``, joined by ``; ``).
    Activity terms act on modules and are in the table and JSON forms."""
    with_depth = any(r.lr_factor is not None for r in rows)
    kinds = [k for k in _shown_kinds(rows) if not (with_depth and k == "depth")]
    detailed = any(_value(s) != repr(s.value) for r in rows for s in r.terms.values())
    noted = any(r.notes for r in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["name", "aliases", "shape", "numel", "trainable", "excluded_by_line"]
        + [c for k in kinds for c in (k, f"{k}_line")]
        + (["depth", "depth_line", "lr_factor"] if with_depth else [])
        + (["details"] if detailed else [])
        + (["notes"] if noted else [])
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
        for kind in kinds:
            setting = row.terms.get(kind)
            cells += [setting.value, setting.pos.line if setting.pos else ""] if setting else ["", ""]
        if with_depth:
            # The parameter's depth (frozen ones too), not the rule's expression ('i + 1' is in details).
            setting = row.terms.get("depth")
            line = setting.pos.line if setting and setting.pos else ""
            cells += [row.depth, line, row.lr_factor] if row.lr_factor is not None else ["", "", ""]
        if detailed:
            cells.append("; ".join(f"{k} {_value(s)}" for k, s in row.terms.items() if _value(s) != repr(s.value)))
        if noted:
            cells.append("; ".join(row.notes))
        writer.writerow(cells)
    return out.getvalue()


def format_groups(groups: Sequence[GroupSummary]) -> str:
    groups = _rows_of(groups, "GroupSummary", "format_groups", "reg.groups_summary()")
    with_mult = any(g.lr_mult != 1.0 for g in groups)
    with_schedule = any(g.schedule for g in groups)
    body = [
        [
            g.name,
            g.space or f"{g.weight_decay:g}",
            *([g.schedule or "-"] if with_schedule else []),
            *([f"{g.lr_mult:g}"] if with_mult else []),
            str(len(g.params)),
            f"{g.numel:,}",
        ]
        for g in groups
    ]
    header = ["group", "weight_decay", *(["schedule"] if with_schedule else []), *(["lr_mult"] if with_mult else []), "tensors", "elements"]
    return _table(header, body, right=[len(header) - 2, len(header) - 1])


def group_records(groups: Sequence[GroupSummary]) -> list[dict[str, Any]]:
    return [
        {
            "name": g.name,
            "weight_decay": g.weight_decay,
            "schedule": g.schedule,
            "lr_mult": g.lr_mult,
            "tensors": len(g.params),
            "elements": g.numel,
            "params": list(g.params),
            **({"space": g.space} if g.space else {}),  # weight_decay is then the space's stand-in
        }
        for g in groups
    ]


def groups_csv(groups: Sequence[GroupSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "weight_decay", "schedule", "lr_mult", "tensors", "elements"])
    for g in groups:
        writer.writerow([g.name, g.weight_decay, g.schedule, g.lr_mult, len(g.params), g.numel])
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
    lines = [(k, c) for k, c in coverage.terms.items() if k in _ALWAYS_SHOWN or c.tensors]
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


def _rows_of(rows: Any, kind: str, function: str, source: str) -> list[Any]:
    # A Regularizer, or the other table's rows, would fail deep inside with an unrelated message.
    from . import resolution  # here: `regdsl check FILE` imports this module without torch

    cls = getattr(resolution, kind)
    found = list(rows) if isinstance(rows, Iterable) and not isinstance(rows, (str, bytes)) else None
    if found is None or not all(isinstance(r, cls) for r in found):
        raise TypeError(f"{function}() takes a list of {kind} ({source}), not {type(rows).__name__}")
    return found
