"""Golden files for the model-aware checks: every ``tests/data/check/NAME.reg`` is a case.

The first line of NAME.reg is ``# model: FACTORY`` (a key of ``check_models.FACTORIES``);
NAME.expected has one ``LINE:COL: SEVERITY CODE: MESSAGE`` line per diagnostic that
``regdsl.check(spec, model)`` must return, in order (by position). An empty
.expected file is a clean case. The expectations were derived by hand from the
rule text and the model's structure (see the docstrings in models.py and
check_models.py), not copied from regdsl's output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from check_models import FACTORIES, model_of

import regdsl
from regdsl.codes import CODES

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data" / "check"
CASES = sorted(DATA.glob("*.reg"))
EXPECTED_LINE = re.compile(r"(\d+):(\d+): (error|warning) (RD\d{3}): (.+)")
# RD105 (a reference for 'to ref') and RD106 (an activity module's output) come from compile()
# with a reference and from the first forward pass, which check never has: tests/test_terms.py
# and tests/test_training.py cover them.
MODEL_LEVEL_CODES = {code for code in CODES if code.startswith(("RD1", "RD2"))} - {"RD105", "RD106"}


def expected_lines(path: Path) -> list[str]:
    return path.with_suffix(".expected").read_text(encoding="utf-8").splitlines()


def rendered(diagnostics: list[regdsl.Diagnostic]) -> list[str]:
    return [f"{d.line}:{d.column}: {d.severity} {d.code}: {d.message}" for d in diagnostics]


def test_corpus_is_present_and_well_formed():
    # Guards the parametrization: an empty glob would silently run no case.
    assert len(CASES) >= 15
    for path in CASES:
        assert path.with_suffix(".expected").exists(), f"{path.name} has no .expected"
        assert model_of(path) in FACTORIES, f"{path.name}: unknown model {model_of(path)!r}"
        for line in expected_lines(path):
            match = EXPECTED_LINE.fullmatch(line)
            assert match, f"{path.with_suffix('.expected').name}: malformed line {line!r}"
            # The severity written in a golden is the one the code has, so a typo cannot hide.
            assert CODES[match.group(4)].severity == match.group(3), line
    # Every .expected belongs to a case (a renamed .reg would leave its golden unused).
    assert {p.stem for p in DATA.glob("*.expected")} == {p.stem for p in CASES}


def test_corpus_covers_every_model_level_code():
    assert MODEL_LEVEL_CODES == {
        "RD101", "RD102", "RD103", "RD104", "RD107", "RD108", "RD201", "RD202", "RD203", "RD204", "RD205", "RD206"
    }
    found = {EXPECTED_LINE.fullmatch(line).group(4) for path in CASES for line in expected_lines(path)}
    assert MODEL_LEVEL_CODES <= found, f"no golden case for {sorted(MODEL_LEVEL_CODES - found)}"
    # And at least one clean case, where check() must say nothing at all.
    assert any(not expected_lines(path) for path in CASES)


def test_every_code_has_a_section_in_the_diagnostics_reference():
    text = (ROOT / "docs" / "diagnostics.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (RD\d{3})\s*$", text, flags=re.MULTILINE))
    assert set(CODES) <= headings, f"docs/diagnostics.md has no '## CODE' section for {sorted(set(CODES) - headings)}"
    assert headings <= set(CODES), f"docs/diagnostics.md documents unknown codes {sorted(headings - set(CODES))}"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_check_golden(path: Path):
    spec = regdsl.load(path)
    model = FACTORIES[model_of(path)]()
    diagnostics = regdsl.check(spec, model)
    assert rendered(diagnostics) == expected_lines(path)
    for d in diagnostics:
        assert d.kind == "model"
        assert d.file == str(path)
        # The source line is the file's own line, so a caret can be drawn under it.
        assert d.source_line == path.read_text(encoding="utf-8").split("\n")[d.line - 1]
