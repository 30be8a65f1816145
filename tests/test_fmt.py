"""`regdsl fmt` and `regdsl.format_source`: canonical text that keeps every comment.

The canonical outputs below are written by hand from the rules in
regdsl/formatter.py and docs/language.md ("Canonical form"): one statement per
line, single spaces, ', ' between globs, globs quoted only when they must be,
numbers as the shortest repr of their float; a comment after the statements of
its line follows the last of them after two spaces; a comment-only line stays;
runs of blank lines become one; leading and trailing blank lines go.

`regdsl fmt` never imports torch, so its runs are cheap.
"""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import entry_point

import regdsl
from regdsl import RegSyntaxError, RegValidationError
from regdsl.formatter import format_source


def fmt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*entry_point(), "fmt", *args], check=False, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- canonical text of hand-written inputs

MESSY = (
    "# header comment\n"
    "\n\n\n"
    "all   decay 0.05;exclude bias   # after two statements\n"
    "   layer  fc2.*  l2 1e-4   \n"
    "\t# indented comment\t\n"
    "\n\n"
    "type Linear,Conv2d l1 .5 ; ; exclude norm\n"
    "# trailing comment\n"
    "\n\n"
)
MESSY_CANONICAL = (
    "# header comment\n"
    "\n"
    "all decay 0.05\n"
    "exclude bias  # after two statements\n"
    "layer fc2.* l2 0.0001\n"
    "# indented comment\n"
    "\n"
    "type Linear, Conv2d l1 0.5\n"
    "exclude norm\n"
    "# trailing comment\n"
)

CASES = {
    "messy": (MESSY, MESSY_CANONICAL),
    # CRLF in, LF out; a run of CRLF blank lines is one blank line.
    "crlf": ("all decay 0.05\r\nexclude bias # x\r\n\r\n\r\n# y\r\n", "all decay 0.05\nexclude bias  # x\n\n# y\n"),
    "mixed-line-ends": ("all l2 1\r\n\n\r\nexclude bias\n", "all l2 1.0\n\nexclude bias\n"),
    # '#' and ';' inside quotes are part of the pattern; the real comment keeps its own ';'.
    "quoted-hash-and-semicolon": (
        'layer "a;b#c"   l2 1 # real comment; not a statement\n',
        'layer "a;b#c" l2 1.0  # real comment; not a statement\n',
    ),
    "three-statements-one-comment": (
        "all l2 1; exclude bias ;exclude norm#c\n",
        "all l2 1.0\nexclude bias\nexclude norm  #c\n",
    ),
    "comment-after-empty-statements": ("all l2 1 ; ; # c\n", "all l2 1.0  # c\n"),
    "comment-keeps-inner-hashes": ("all l2 1 # a # b\n", "all l2 1.0  # a # b\n"),
    "bom": ("\ufeffall l2 1\n", "all l2 1.0\n"),
    "no-final-newline": ("exclude bias", "exclude bias\n"),
    "tabs-and-form-feeds": ("all\tl2\t1e-4\f#\ttabbed  \n", "all l2 0.0001  #\ttabbed\n"),
    "needless-quotes-go": ('layer "fc2", "blocks@0.w" l2 1\n', 'layer fc2, "blocks@0.w" l2 1.0\n'),
    "keywords-as-names": ("layer norm,type l2 1\n", "layer norm, type l2 1.0\n"),
    "numbers": ("all l2 5E-3 l1 +2 decay 1e16\n", "all l2 0.005 l1 2.0 decay 1e+16\n"),
    "term-order-is-meaning": ("all l2 1  none   decay 2\n", "all l2 1.0 none decay 2.0\n"),
    "comments-only": ("\n\n#\n\n\n   # b   \n\n", "#\n\n# b\n"),
    "blank": ("\n \n\t\n", ""),
    # Depths: spaces around '+' and '-', '+ 0' dropped; lr_decay keeps its line.
    "depths": (
        "layer  blocks.{i}.**  depth i+1 # blocks\nall depth last-0;layer \"{j}.x\", a.{j} depth j -2\n lr_decay   .75\n",
        "layer blocks.{i}.** depth i + 1  # blocks\nall depth last\nlayer {j}.x, a.{j} depth j - 2\nlr_decay 0.75\n",
    ),
    "lr-decay-first-in-the-file": (
        "lr_decay 1;all depth 03\n",
        "lr_decay 1.0\nall depth 3\n",
    ),
    # On a line it shares, lr_decay keeps its place among the statements (it was moved first).
    "lr-decay-after-a-statement-on-its-line": (
        "layer x depth 1; lr_decay 0.9  # c\n",
        "layer x depth 1\nlr_decay 0.9  # c\n",
    ),
    "empty": ("", ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_canonical_text(name: str) -> None:
    source, expected = CASES[name]
    out = format_source(source)
    assert out == expected
    assert format_source(out) == out  # canonical text is a fixed point
    assert regdsl.parse(out) == regdsl.parse(source)


def test_format_source_is_public_and_names_the_file_in_errors() -> None:
    assert regdsl.format_source is format_source
    with pytest.raises(RegSyntaxError) as info:
        format_source("all decay 0.05\nall l3 1 # comment\n", "rules.reg")
    (d,) = info.value.diagnostics
    assert (d.file, d.line, d.column, d.code) == ("rules.reg", 2, 5, "RD001")
    with pytest.raises(RegValidationError) as info:
        format_source("all l2 -1\n", "rules.reg")
    assert info.value.diagnostics[0].code == "RD004"


# ---------------------------------------------------------------- the command


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "messy": tmp_path / "messy.reg",
        "clean": tmp_path / "clean.reg",
        "bad": tmp_path / "bad.reg",
        "crlf": tmp_path / "crlf.reg",
    }
    out["messy"].write_bytes(MESSY.encode())
    out["clean"].write_bytes(MESSY_CANONICAL.encode())
    out["bad"].write_bytes(b"all   decay 0.05\nall l3 1 # comment\n")
    out["crlf"].write_bytes(b"all l2 1.0\r\n")
    return out


def snapshot(paths) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_fmt_rewrites_what_changes_and_leaves_the_rest(files: dict[str, Path]) -> None:
    before = snapshot([files["clean"]])
    result = fmt(str(files["messy"]), str(files["clean"]), str(files["crlf"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 files reformatted, 1 left unchanged.\n"
    assert result.stderr == ""
    assert files["messy"].read_bytes() == MESSY_CANONICAL.encode()
    assert files["crlf"].read_bytes() == b"all l2 1.0\n"
    assert snapshot([files["clean"]]) == before  # not even rewritten with the same bytes
    # A second run finds nothing to do.
    again = fmt(str(files["messy"]), str(files["clean"]), str(files["crlf"]))
    assert (again.returncode, again.stdout) == (0, "0 files reformatted, 3 left unchanged.\n")


def test_fmt_check_changes_nothing_and_exits_1_when_a_file_would_change(files: dict[str, Path]) -> None:
    before = snapshot(files.values())
    result = fmt("--check", str(files["messy"]), str(files["clean"]), str(files["crlf"]))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"Would reformat: {files['messy']}",
        f"Would reformat: {files['crlf']}",  # only the line ending differs
        "2 files would be reformatted, 1 left unchanged.",
    ]
    assert snapshot(files.values()) == before

    clean = fmt("--check", str(files["clean"]))
    assert (clean.returncode, clean.stdout) == (0, "0 files would be reformatted, 1 left unchanged.\n")


def test_fmt_diff_prints_a_unified_diff_and_changes_nothing(tmp_path: Path, files: dict[str, Path]) -> None:
    path = tmp_path / "small.reg"
    path.write_bytes(b"all  l2 1\nexclude bias\n# keep\n\n\nexclude norm   # n\n")
    before = snapshot([path, files["clean"]])
    result = fmt("--diff", str(path), str(files["clean"]))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"--- {path}",
        f"+++ {path} (formatted)",
        "@@ -1,6 +1,5 @@",
        "-all  l2 1",
        "+all l2 1.0",
        " exclude bias",
        " # keep",
        " ",
        "-",
        "-exclude norm   # n",
        "+exclude norm  # n",
    ]
    # The summary goes to stderr, so stdout is a diff that `patch` can take.
    assert result.stderr == "1 file would be reformatted, 1 left unchanged.\n"
    assert snapshot([path, files["clean"]]) == before

    clean = fmt("--diff", str(files["clean"]))
    assert (clean.returncode, clean.stdout) == (0, "")
    # A file with errors: its diagnostics go to stderr too (before, into the patch on stdout).
    broken = tmp_path / "broken.reg"
    broken.write_text("all l3 1\n")
    mixed = fmt("--diff", str(path), str(broken))
    assert mixed.stdout.startswith(f"--- {path}\n") and "RD001" not in mixed.stdout
    assert "error: RD001" in mixed.stderr and mixed.stderr.endswith("1 file would be reformatted, 0 left unchanged, 1 with errors.\n")


def test_fmt_diff_of_a_file_without_a_final_newline_is_a_valid_diff(tmp_path: Path) -> None:
    path = tmp_path / "nonl.reg"
    path.write_bytes(b"all l2 1")
    result = fmt("--diff", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "-all l2 1" in lines
    assert "+all l2 1.0" in lines


def test_fmt_invalid_file_prints_its_diagnostics_exits_1_and_is_untouched(files: dict[str, Path]) -> None:
    before = snapshot([files["bad"]])
    result = fmt(str(files["bad"]), str(files["messy"]))
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert out[0].startswith(f"{files['bad']}:2:5: error: RD001 unexpected 'l3'")
    assert out[1:3] == ["all l3 1 # comment", "    ^^"]
    assert out[-1] == "1 file reformatted, 0 left unchanged, 1 with errors."
    assert snapshot([files["bad"]]) == before
    # The valid file beside it is still formatted.
    assert files["messy"].read_bytes() == MESSY_CANONICAL.encode()

    check = fmt("--check", str(files["bad"]))
    assert check.returncode == 1
    assert check.stdout.splitlines()[-1] == "0 files would be reformatted, 0 left unchanged, 1 with errors."
    assert snapshot([files["bad"]]) == before


def test_fmt_unreadable_file_exits_2(tmp_path: Path) -> None:
    result = fmt(str(tmp_path / "missing.reg"))
    assert result.returncode == 2
    assert result.stderr.startswith("regdsl: error: cannot read ")
    assert "missing.reg" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- generated rule files
#
# Each generated line is kept as structure (its statements, each with the text written and
# its canonical text, and its comment), so the test knows what every line must become.

# (written, canonical)
PATTERNS = [
    ("fc2.*", "fc2.*"), ("**.bias", "**.bias"), ('"fc2"', "fc2"), ('"a b"', '"a b"'), ('"x#y;z"', '"x#y;z"'),
    ("norm", "norm"), ("blocks.[0-3].**", "blocks.[0-3].**"), ('"caf\u00e9"', '"caf\u00e9"'), ("a-b", "a-b"),
    ("type", "type"), ('"all"', "all"),
]
NUMBERS = [
    ("0", "0.0"), ("0.01", "0.01"), (".5", "0.5"), ("5E-3", "0.005"), ("1e-4", "0.0001"), ("1", "1.0"),
    ("1.", "1.0"), ("+2", "2.0"), ("1e16", "1e+16"), ("0.000", "0.0"), ("1e-06", "1e-06"),
]
SPACE = st.sampled_from([" ", "  ", "\t", " \t ", "\f"])
OPTIONAL_SPACE = st.sampled_from(["", " ", "  ", "\t", "\f"])


@st.composite
def atoms(draw) -> tuple[str, str]:
    kind = draw(st.sampled_from(["all", "bias", "norm", "embedding", "layer", "type"]))
    if kind not in ("layer", "type"):
        return kind, kind
    patterns = draw(st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3))
    comma = draw(st.sampled_from([",", ", ", " ,", " , ", "\t,"]))
    return (
        f"{kind}{draw(SPACE)}{comma.join(w for w, _ in patterns)}",
        f"{kind} {', '.join(c for _, c in patterns)}",
    )


@st.composite
def statements(draw) -> tuple[str, str]:
    selector = draw(st.lists(atoms(), min_size=1, max_size=3))
    written = [w for w, _ in selector]
    canonical = [c for _, c in selector]
    if draw(st.booleans()):
        return f"exclude{draw(SPACE)}" + draw(SPACE).join(written), "exclude " + " ".join(canonical)
    for kind in draw(st.lists(st.sampled_from(["decay", "l1", "l2", "none"]), min_size=1, max_size=4, unique=True)):
        if kind == "none":
            written.append(kind)
            canonical.append(kind)
        else:
            number, number_canonical = draw(st.sampled_from(NUMBERS))
            written.append(f"{kind}{draw(SPACE)}{number}")
            canonical.append(f"{kind} {number_canonical}")
    return draw(SPACE).join(written), " ".join(canonical)


# Comment text: anything but a line end (and lone surrogates, which cannot be written as UTF-8).
comments = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=15).map(
    lambda t: "#" + t
)


@dataclass
class Line:
    statements: list[tuple[str, str]]  # (written, canonical)
    comment: str | None
    text: str  # the line as written, without its line end


@st.composite
def lines(draw) -> Line:
    stmts = draw(st.lists(statements(), max_size=3))
    comment = draw(st.one_of(st.none(), comments))
    text = draw(OPTIONAL_SPACE)
    for i, (written, _) in enumerate(stmts):
        text += written
        last = i == len(stmts) - 1
        # Between statements a ';' is needed; after the last one it is optional (and may repeat).
        if not last or draw(st.booleans()):
            text += draw(st.sampled_from([";", " ; ", "; ", ";;", " ;\t; "]))
    if comment is not None:
        text += draw(OPTIONAL_SPACE) + comment
    text += draw(OPTIONAL_SPACE)
    if not stmts and comment is None and draw(st.booleans()):
        text += ";"  # an empty statement on an otherwise blank line
    return Line(stmts, comment, text)


@st.composite
def rule_files(draw) -> tuple[str, list[Line]]:
    body = draw(st.lists(st.one_of(lines(), st.just(Line([], None, ""))), max_size=10))
    ends = [draw(st.sampled_from(["\n", "\r\n"])) for _ in body]
    text = "".join(line.text + end for line, end in zip(body, ends))
    if body and draw(st.booleans()):
        text = text[: -len(ends[-1])]  # no line end after the last line
    if draw(st.integers(0, 9)) == 0:
        text = "\ufeff" + text
    return text, body


def comments_in(text: str) -> list[str]:
    """The comment of each line: from the first '#' outside double quotes (quotes never span lines)."""
    found = []
    for line in text.split("\n"):
        in_quote = False
        for i, c in enumerate(line):
            if c == '"':
                in_quote = not in_quote
            elif c == "#" and not in_quote:
                found.append(line[i:])
                break
    return found


def expected_output(body: list[Line]) -> str:
    out: list[str] = []
    for line in body:
        comment = line.comment.rstrip() if line.comment is not None else None
        if line.statements:
            out += [canonical for _, canonical in line.statements]
            if comment:
                out[-1] += "  " + comment
        elif comment:
            out.append(comment)
        elif out and out[-1] != "":
            out.append("")
    while out and out[-1] == "":
        out.pop()
    return "".join(line + "\n" for line in out)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(rule_files())
@example(('layer "x#y" l2 1 # c; "d\r\n', [Line([('layer "x#y" l2 1', 'layer "x#y" l2 1.0')], '# c; "d', "")]))
def test_format_is_idempotent_keeps_the_spec_and_every_comment(file: tuple[str, list[Line]]) -> None:
    source, body = file
    out = format_source(source)
    assert format_source(out) == out, "not idempotent"
    assert regdsl.parse(out) == regdsl.parse(source), "the spec changed"
    written = [line.comment for line in body if line.comment is not None]
    # Every comment, in order; only trailing whitespace may go.
    assert comments_in(out) == [c.rstrip() for c in written]
    assert "\r" not in out


@SETTINGS
@given(rule_files())
def test_format_puts_each_statement_on_its_line_and_comments_after_the_last(file: tuple[str, list[Line]]) -> None:
    source, body = file
    out = format_source(source)
    assert out == expected_output(body)
    # The layout rules, read off the output alone.
    if out == "":
        assert regdsl.parse(source).statements == () and all(line.comment is None for line in body)
        return
    assert out.endswith("\n")
    lines_out = out[:-1].split("\n")
    assert all(line == line.strip() for line in lines_out), out
    assert "" not in (lines_out[:1] + lines_out[-1:]), "leading or trailing blank line"
    assert all(not (a == b == "") for a, b in itertools.pairwise(lines_out)), "two blank lines in a row"
    statement_lines = [line for line in lines_out if line and not line.startswith("#")]
    assert len(statement_lines) == len(regdsl.parse(source).statements)
