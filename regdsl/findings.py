"""Model diagnostics made in bulk: :func:`regdsl.errors.model_diagnostic`, with the source
split into lines once per file instead of once per diagnostic (a 50,000-line file
with thousands of overridden rules made that quadratic)."""

from __future__ import annotations

import functools
from typing import Any

from .codes import CODES
from .errors import Diagnostic


@functools.lru_cache(maxsize=8)
def _lines(source: str) -> list[str]:
    # A str caches its hash, and the cache compares the very same object first: a hit costs nothing.
    return source.split("\n")


def model_diagnostic(spec: Any, pos: Any, code: str, message: str) -> Diagnostic:
    """A diagnostic about the spec against a model, pinned to ``pos`` in the spec's source."""
    line, column = (pos.line, pos.column) if pos else (0, 0)
    source_line = ""
    if spec.source and pos:
        lines = _lines(spec.source)
        source_line = lines[line - 1].removesuffix("\r") if 0 < line <= len(lines) else ""
    return Diagnostic(
        line=line,
        column=column,
        end_line=pos.end_line if pos else None,
        end_column=pos.end_column if pos else None,
        message=message,
        file=spec.origin or "<string>",
        severity=CODES[code].severity,
        kind="model",
        code=code,
        source_line=source_line,
    )
