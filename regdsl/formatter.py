"""Rewrite a rule file in canonical form, keeping every comment.

One statement per line (``a; b`` becomes two lines), canonical spelling of
each statement (see :meth:`Spec.to_source`), a comment after the statements of
its line stays after the last of them, runs of blank lines shrink to one.
Formatting never changes meaning: ``parse(format_source(t)) == parse(t)``, and every search
space keeps its name. An unnamed space is named by its line (``"l1:4"``), the name trials,
``with_values()`` and ``reg.values()`` know it by, so a file where formatting would move one to
another line is refused (RD014) rather than formatted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .build import parse
from .errors import RegValidationError, model_diagnostic
from .parser import split_line
from .printer import format_lr_decay, format_statement
from .spaces import unnamed

if TYPE_CHECKING:  # pragma: no cover
    from .spec import Spec


def format_source(text: str, filename: str = "<string>") -> str:
    """Canonical text of a valid rule file; an invalid one raises its ``RegDslError``."""
    spec = parse(text, filename)
    # The text as parse() read it, BOM removed (fmt drops it), so line numbers match the spec's.
    text = spec.source or ""
    # Per line, its statements in the order written: lr_decay too stays where it stands on its line.
    placed: list[tuple[int, int, str]] = []
    if spec.lr_decay is not None:
        assert spec.lr_decay.pos is not None
        placed.append((spec.lr_decay.pos.line, spec.lr_decay.pos.column, format_lr_decay(spec.lr_decay)))
    for statement in spec.statements:
        assert statement.pos is not None  # parse() positions every node
        placed.append((statement.pos.line, statement.pos.column, format_statement(statement)))
    by_line: dict[int, list[str]] = {}
    for line, _, formatted in sorted(placed, key=lambda p: p[:2]):
        by_line.setdefault(line, []).append(formatted)
    out: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        _, comment_at = split_line(line)
        comment = line[comment_at:].rstrip() if comment_at is not None else None
        statements = by_line.get(number, [])
        if statements:
            out.extend(statements)
            if comment:
                out[-1] += f"  {comment}"
        elif comment:
            out.append(comment)
        elif out and out[-1] != "":
            out.append("")  # one blank line survives; the rest, and trailing ones, go
    while out and out[-1] == "":
        out.pop()
    formatted = "".join(f"{line}\n" for line in out)
    before = unnamed(spec)
    if before:
        _keep_names(spec, before, unnamed(parse(formatted, filename)))
    return formatted


def _keep_names(spec: Spec, before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    renamed = [
        model_diagnostic(
            spec,
            space.pos,
            "RD014",
            f"formatting would rename this search space from '{old}' to '{new}': an unnamed space is named by its "
            "line, and trials, with_values() and reg.values() know it by that name; name it ('... as NAME'), then format",
            kind="validation",
        )
        for (old, space), (new, _) in zip(before, after)
        if old != new
    ]
    if renamed:
        raise RegValidationError(renamed)
