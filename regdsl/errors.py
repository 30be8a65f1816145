"""Diagnostics and the exception hierarchy.

Every problem regdsl reports is a :class:`Diagnostic` pinned to a position in a
rule file. Exceptions carry all diagnostics of one file, sorted by position, so
a user fixes everything in one round instead of one error per run.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .codes import CODES, Severity

if TYPE_CHECKING:  # pragma: no cover - errors.py stays importable without pydantic's models loaded
    from .spec import Span, Spec

_ANSI = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m", "bold": "\x1b[1m", "caret": "\x1b[1;34m", "reset": "\x1b[0m"}


@dataclass(frozen=True)
class Diagnostic:
    """One problem at one place in a rule file (1-based line and column)."""

    line: int
    column: int
    message: str
    file: str = "<string>"
    end_line: int | None = None
    end_column: int | None = None
    severity: Severity = "error"
    kind: Literal["syntax", "validation", "compile", "model"] = "validation"
    code: str = ""  # a key of regdsl.codes.CODES
    source_line: str = ""
    expected: tuple[str, ...] = ()

    def sort_key(self) -> tuple[str, int, int]:
        return (self.file, self.line, self.column)

    def __lt__(self, other: Diagnostic) -> bool:
        # Diagnostics sort by position; equality still compares every field.
        return self.sort_key() < other.sort_key()

    def render(self, color: bool = False) -> str:
        """``file:line:col: error: CODE message``, the source line and a caret; ANSI colour on request."""
        paint = _ANSI if color else dict.fromkeys(_ANSI, "")
        code = f"{paint['bold']}{self.code}{paint['reset']} " if self.code else ""
        head = (
            f"{paint['bold']}{self.file}:{self.line}:{self.column}:{paint['reset']} "
            f"{paint[self.severity]}{self.severity}:{paint['reset']} {code}{self.message}"
        )
        if not self.source_line:
            return head
        shown, column, width = _window(self.source_line, self.column, self._caret_width())
        caret = caret_line(shown, column, width)
        # A lone '\r' would send the terminal back to the line's start, over what precedes it.
        shown = shown.replace("\r", " ")
        return f"{head}\n{shown}\n{paint['caret']}{caret}{paint['reset']}"

    def _caret_width(self) -> int:
        if self.end_line == self.line and self.end_column and self.end_column > self.column:
            return self.end_column - self.column
        return 1


# Characters of a long source line shown around the caret: each diagnostic repeats its line, so a
# generated one-line file of 20,000 rules printed 10 GB where its diagnostics alone are a few MB.
SHOWN = 160


def quoted(text: str) -> str:
    """User text inside a message, its middle cut past :data:`SHOWN` characters (``a.a...a.a``): the
    source line under the message is cut so already, and a 100,000-character pattern was printed whole."""
    if len(text) <= SHOWN:
        return text
    return text[: SHOWN // 2] + "..." + text[-SHOWN // 2 :]


def _window(line: str, column: int, width: int) -> tuple[str, int, int]:
    """``line`` cut to :data:`SHOWN` characters around ``column`` (``...`` marks a cut), the column
    and the caret's width in what is shown."""
    if len(line) <= SHOWN:
        return line, column, width
    start = max(0, min(column - 1 - SHOWN // 4, len(line) - SHOWN))
    end = start + SHOWN
    before, after = ("..." if start else ""), ("..." if end < len(line) else "")
    visible = min(column - 1 + width, end) - (column - 1)
    return before + line[start:end] + after, column - start + len(before), max(1, visible)


def caret_line(source_line: str, column: int, width: int = 1) -> str:
    # Tabs are copied so the caret lines up however the terminal expands them.
    before = source_line[: column - 1]
    prefix = re.sub(r"[^\t]", " ", before) if "\t" in before else " " * len(before)
    return prefix + "^" * max(1, width)


def source_line_at(text: str, line: int) -> str:
    # Only '\n' ends a line, as in the lexer; str.splitlines() would also split on form feeds.
    lines = text.split("\n")
    return lines[line - 1].removesuffix("\r") if 0 < line <= len(lines) else ""


class RegDslError(Exception):
    """Base of every error regdsl raises. ``.diagnostics`` lists each problem."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(line=0, column=0, message=diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = sorted(diagnostics, key=Diagnostic.sort_key)
        super().__init__(self._text())

    def _text(self) -> str:
        return "\n".join(d.render() if d.line else d.message for d in self.diagnostics)

    # The first diagnostic's position, for callers that want just one.
    @property
    def file(self) -> str:
        return self.diagnostics[0].file

    @property
    def line(self) -> int:
        return self.diagnostics[0].line

    @property
    def column(self) -> int:
        return self.diagnostics[0].column

    @property
    def source_line(self) -> str:
        return self.diagnostics[0].source_line

    @property
    def caret(self) -> str:
        d = self.diagnostics[0]
        return caret_line(d.source_line, d.column, d._caret_width())

    @property
    def expected(self) -> tuple[str, ...]:
        return self.diagnostics[0].expected


class RegSyntaxError(RegDslError):
    """The text is not in the regdsl language (raised when any diagnostic is a syntax error)."""


class RegValidationError(RegDslError):
    """The text parses, but a value or pattern in it is invalid."""


class RegCompileError(RegDslError):
    """A valid spec cannot be applied to the given model."""


class RegUsageError(RegDslError, ValueError):
    """The Python API was called with arguments that contradict the rule file."""


class RegStateError(RegUsageError):
    """A saved state cannot be resumed as it is: the rules now group the parameters differently,
    or the optimizer state does not belong to the saved layout.

    Loading the optimizer state as saved would hand parameters another parameter's
    state (torch matches it by position); ``reg.remap_optimizer_state`` matches it by name.
    """

    changes: tuple[str, ...] = ()  # what changed, a line each, when the rules group the parameters differently


class RegDslWarning(UserWarning):
    """A probable mistake in a rule file (a warning-severity diagnostic) found while compiling.

    ``warnings.simplefilter("error", regdsl.RegDslWarning)`` turns them into errors: a strict run.
    """


def name_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def model_diagnostic(
    spec: Spec, pos: Span | None, code: str, message: str, kind: Literal["validation", "model", "compile"] = "model"
) -> Diagnostic:
    """A diagnostic about the spec against a model (or, ``kind="compile"``, about compiling it; or,
    ``kind="validation"``, about the file alone), pinned to ``pos`` in the spec's source."""
    line, column = (pos.line, pos.column) if pos else (0, 0)
    return Diagnostic(
        line=line,
        column=column,
        end_line=pos.end_line if pos else None,
        end_column=pos.end_column if pos else None,
        message=message,
        file=spec.origin or "<string>",
        severity=CODES[code].severity,
        kind=kind,
        code=code,
        source_line=source_line_at(spec.source, line) if spec.source and pos else "",
    )


def caller_stacklevel(through_torch: bool = False) -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the first frame outside this package
    (its integrations included): the user's call, however many of regdsl.compile, Spec.compile and
    Regularizer() lie between. ``through_torch``: torch's frames are skipped too, for a warning
    issued from a hook torch runs (``opt.step()`` is then the line named)."""
    inside = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    if through_torch:
        import torch

        inside.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(inside)):
        frame, level = frame.f_back, level + 1
    return level
