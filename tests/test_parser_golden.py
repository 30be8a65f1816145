"""Golden files for the parser: every ``.reg`` under tests/data/parse is a case.

valid/NAME.reg has NAME.canonical, the exact text ``to_source()`` must print.
invalid/NAME.reg has NAME.expected, one ``LINE:COL: KIND CODE: MESSAGE`` per diagnostic,
in the order the exception lists them (by position). Both were written by hand
from the language's rules, not copied from the code's output, so a change in
wording or position shows up here as a diff to judge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import regdsl
from regdsl import RegDslError, RegSyntaxError, RegValidationError

DATA = Path(__file__).parent / "data" / "parse"
VALID = sorted((DATA / "valid").glob("*.reg"))
INVALID = sorted((DATA / "invalid").glob("*.reg"))


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _read_exact(path: Path) -> str:
    # newline="" keeps the bytes as written: a golden must not depend on the platform.
    if not path.exists():
        return ""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def test_golden_sets_are_present():
    # Guards the parametrization: an empty glob would silently run no case at all.
    assert len(VALID) >= 8
    assert len(INVALID) >= 12
    for path in VALID:
        assert path.with_suffix(".canonical").exists(), f"{path.name} has no .canonical"
    for path in INVALID:
        assert path.with_suffix(".expected").exists(), f"{path.name} has no .expected"


def test_crlf_goldens_still_have_crlf():
    # A git checkout with autocrlf could turn these into LF files and quietly stop testing CRLF.
    for name in ("valid/crlf.reg", "invalid/crlf_errors.reg"):
        assert b"\r\n" in (DATA / name).read_bytes(), name


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_valid_file_prints_canonical_text(path: Path):
    spec = regdsl.load(path)
    assert spec.to_source() == _read_exact(path.with_suffix(".canonical"))


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_valid_file_reparses_from_canonical_text(path: Path):
    spec = regdsl.load(path)
    again = regdsl.parse(spec.to_source())
    assert again == spec
    # Canonical text is a fixed point: printing the reparsed spec changes nothing.
    assert again.to_source() == spec.to_source()


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_canonical_file_is_itself_valid_and_canonical(path: Path):
    # The .canonical files are hand-written; this catches a typo in them that
    # would otherwise show up only as a confusing diff in the test above.
    canonical = _read_exact(path.with_suffix(".canonical"))
    assert regdsl.parse(canonical).to_source() == canonical


def _rendered(diagnostics) -> list[str]:
    return [f"{d.line}:{d.column}: {d.kind} {d.code}: {d.message}" for d in diagnostics]


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_file_diagnostics(path: Path):
    expected = _read_exact(path.with_suffix(".expected")).splitlines()
    with pytest.raises(RegDslError) as info:
        regdsl.load(path)
    err = info.value
    assert _rendered(err.diagnostics) == expected
    # The exception class follows from the kinds: any syntax problem makes it a syntax error.
    kinds = {line.split(": ")[1].split()[0] for line in expected}
    wanted = RegSyntaxError if "syntax" in kinds else RegValidationError
    assert type(err) is wanted
    for d in err.diagnostics:
        assert d.file == str(path)


def test_rendered_diagnostic_has_head_source_line_and_caret():
    path = DATA / "invalid" / "unknown_term_l3.reg"
    with pytest.raises(RegSyntaxError) as info:
        regdsl.load(path)
    (diag,) = info.value.diagnostics
    head, source, caret = diag.render().split("\n")
    assert head.startswith(f"{path}:1:13: error: RD001 unexpected 'l3'")
    assert source == "layer fc2.* l3 0.01"
    # The caret sits under column 13 and covers the two characters of 'l3'.
    assert caret == " " * 12 + "^^"
    assert source[caret.index("^") : caret.index("^") + len("l3")] == "l3"
    # The exception's own text is the rendered diagnostic, so a traceback shows it too.
    assert str(info.value) == diag.render()
