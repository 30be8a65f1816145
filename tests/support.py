"""Helpers shared by the tests: the CLI and report tests, and the timm tests' second environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def entry_point() -> list[str]:
    """The installed ``regdsl`` script: the one beside this interpreter (a venv), else the one on PATH."""
    script = Path(sys.executable).with_name("regdsl")
    if script.exists():
        return [str(script)]
    found = shutil.which("regdsl")
    if found is None:
        pytest.skip("the regdsl entry point is not installed")
    return [found]


# The interpreter of the environment .ci/run builds for timm (README, Quick start): timm needs a
# torchvision that imports, which this environment's CPU torch has none of.
TIMM_PYTHON = os.environ.get("REGDSL_TIMM_PYTHON")
NO_TIMM = "no timm here and REGDSL_TIMM_PYTHON unset: see README, Quick start"


def run_in_timm_environment(test_file: str) -> None:
    """Run ``test_file`` with REGDSL_TIMM_PYTHON: every test there must pass, none skip, nothing warn."""
    assert TIMM_PYTHON is not None
    done = subprocess.run(
        [TIMM_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        capture_output=True, text=True, timeout=900, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout and "warning" not in done.stdout, done.stdout


def table_columns(lines: list[str]) -> list[tuple[int, int]]:
    """Column spans (start, end) read from the dashes under the header."""
    return [m.span() for m in re.finditer(r"-+", lines[1])]


def aligned_cells(lines: list[str], right: set[int]) -> list[list[str]]:
    """Every cell of the header and of every row sits inside its column: left-aligned cells
    start at the column's offset, right-aligned ones end at its last character, and the gaps
    between columns are blank. Returns the cells of the header and the rows."""
    spans = table_columns(lines)
    assert lines[1] == "  ".join("-" * (end - start) for start, end in spans)
    width = spans[-1][1]
    out = []
    for number, line in enumerate([lines[0], *lines[2:]]):
        assert len(line) <= width and line == line.rstrip(), (number, line)
        padded = line.ljust(width)
        cells = []
        for i, (start, end) in enumerate(spans):
            gap = padded[spans[i - 1][1] : start] if i else ""
            assert gap.strip() == "", f"line {number}: text between columns {i - 1} and {i}: {line!r}"
            cell = padded[start:end]
            if cell.strip():
                if i in right:
                    assert cell[-1] != " ", f"line {number}, column {i} is not right-aligned: {line!r}"
                else:
                    assert cell[0] != " ", f"line {number}, column {i} does not start at offset {start}: {line!r}"
            cells.append(cell.strip())
        out.append(cells)
    return out
