"""The pipeline's arrows point one way: nothing that compiles or runs a rule file imports the
presentation modules (README, Layout). Read from the source with ast, so a lazy import inside
a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import regdsl

PACKAGE = Path(regdsl.__file__).resolve().parent
PRESENTATION = {"lint", "formatter", "report", "loading", "cli", "plot", "__main__"}
# The package's front door re-exports the public API, presentation included, lazily.
FRONT = {"__init__"}


def imported(path: Path) -> set[str]:
    """The regdsl modules ``path`` imports, by their short name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("regdsl."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("regdsl."))
    return found


def test_the_compiler_and_runtime_import_no_presentation_code() -> None:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    assert {"compiler", "fold", "penalties", "resolution", "report", "cli"} <= set(modules)  # the test reads the real package
    offenders = {
        name: sorted(imported(path) & PRESENTATION)
        for name, path in modules.items()
        if name not in PRESENTATION | FRONT and imported(path) & PRESENTATION
    }
    assert offenders == {}


def test_the_check_reads_relative_and_absolute_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from .report import x\nfrom . import lint\nimport regdsl.cli\nfrom regdsl.formatter import y\n")
    assert imported(source) == {"report", "lint", "cli", "formatter"}
