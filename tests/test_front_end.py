"""The language front end is robust: any text gives a spec or positioned errors, never a traceback.

Huge integers, malformed character classes, many bad lines, doubled BOMs: `parse`,
`regdsl check` and `regdsl fmt` agree on every input, and recovering from N bad lines
costs O(N) work, counted in tokens lexed and characters handed to lark, not in seconds.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import lark
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lark.exceptions import UnexpectedInput

import regdsl
from regdsl import RegDslError, RegSyntaxError, RegValidationError, parser
from regdsl.cli import main
from regdsl.glob import GlobError, glob_regex

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HUGE = "9" * 5000  # past int()'s 4,300-digit limit
LONG_ONE = "1" * 4301


def cli(*args: str) -> tuple[int, str]:
    """``regdsl ARGS`` in this process: the exit code and everything printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def write(directory: Path, text: str, name: str = "rules.reg") -> Path:
    path = directory / name
    path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation, a BOM stays a BOM
    return path


def only_diagnostic(text: str, error: type[RegDslError] = RegValidationError):
    with pytest.raises(error) as info:
        regdsl.parse(text)
    (d,) = info.value.diagnostics
    return d


# ---------------------------------------------------------------- whole numbers


@pytest.mark.parametrize(
    "digits", [HUGE, LONG_ONE, "0" * 5000 + "99999999999999999999"], ids=["9x5000", "1x4301", "zeros"]
)
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("all l1 1 warmup ", ""),
        ("all l1 1 from ", ""),
        ("all l1 1 until ", ""),
        ("all l1 1 cosine to 0 over ", ""),
        ("layer fc group_lasso 1 dim=", ""),
        ("layer fc max_norm 1 dim=-", " # negative"),
    ],
    ids=["warmup", "from", "until", "over", "dim", "negative-dim"],
)
def test_huge_whole_number_is_positioned_rd007(before: str, after: str, digits: str):
    text = f"exclude bias\n{before}{digits}{after}\n"
    d = only_diagnostic(text)
    assert (d.code, d.line, d.column) == ("RD007", 2, len(before) + 1 - before.endswith("-"))
    assert "out of range" in d.message and len(d.message) < 100
    assert d.source_line == text.splitlines()[1]


def test_whole_numbers_are_int64():
    biggest = 2**63 - 1
    spec = regdsl.parse(f"all l1 1 warmup {biggest}\nall l2 1 until {biggest}\nlayer fc group_lasso 1 dim=-{biggest}")
    assert spec.statements[0].terms[0].schedule.get("warmup").steps == biggest
    assert spec.statements[1].terms[0].schedule.get("until").step == biggest
    assert spec.statements[2].terms[0].dim == -biggest
    assert regdsl.parse(spec.to_source()) == spec
    for text in (f"all l1 1 warmup {biggest + 1}", "all l1 1 from 1e19", f"layer fc group_lasso 1 dim=-{biggest + 1}"):
        assert only_diagnostic(text).code == "RD007", text
    # Leading zeros count for nothing: this is 5.
    assert regdsl.parse(f"all l1 1 warmup {'0' * 5000}5").statements[0].terms[0].schedule.get("warmup").steps == 5


@pytest.mark.parametrize(
    ("text", "code", "column", "shown"),
    [
        ("all l1 1 warmup 1.0000000000000000001", "RD007", 17, "1.0000000000000000001"),
        ("layer fc group_lasso 1 dim=0.99999999999999999", "RD007", 28, "0.99999999999999999"),
        ("all l1 1 from 0.9999999999999999999 until 2", "RD007", 15, "0.9999999999999999999"),
        ("all depth 2.0000000000000001\nlr_decay 0.5", "RD013", 11, "2.0000000000000001"),
    ],
)
def test_a_fraction_a_float_would_round_away_is_refused_as_written(text: str, code: str, column: int, shown: str):
    d = only_diagnostic(text)
    assert (d.code, d.line, d.column) == (code, 1, column)
    assert d.message.endswith(f"got {shown}"), d.message


def test_a_whole_number_written_with_a_point_or_an_exponent_is_read_exactly():
    # Through a float, 2**53 + 1 read as 2**53, and 2**63 - 1 as 2**63 (out of range).
    for written, steps in [("9007199254740993.0", 2**53 + 1), ("9223372036854775807.0", 2**63 - 1), ("1e3", 1000), ("2.0", 2)]:
        spec = regdsl.parse(f"all l1 1 warmup {written}")
        assert spec.statements[0].terms[0].schedule.get("warmup").steps == steps, written
    assert only_diagnostic("all l1 1 warmup 9223372036854775808.0").code == "RD007"
    assert regdsl.parse("layer fc group_lasso 1 dim=-1.0").statements[0].terms[0].dim == -1


def test_huge_literal_elsewhere_is_rd003_with_a_short_message():
    d = only_diagnostic(f"all l2 {HUGE}")
    assert d.code == "RD003" and "infinity" in d.message and len(d.message) < 100
    assert only_diagnostic(f"all l1 1 cosine to 1e{HUGE} over 3").code == "RD003"


def test_huge_numbers_through_check_and_fmt(tmp_path: Path):
    path = write(tmp_path, f"all l1 1 warmup {HUGE}\n")
    for command in (["check", str(path)], ["fmt", str(path)], ["fmt", "--check", str(path)]):
        code, out = cli(*command)
        assert code == 1, out
        assert f"{path}:1:17: error: RD007 warmup is out of range" in out
        assert "Traceback" not in out


# ---------------------------------------------------------------- globs


BAD_CLASSES = ["[]", "[!]", "x[]", "a.[]b", "[]x", "[!]x", "x[", "[!", "[z-a]", "[a--]", "fc]1", "[a]]"]


@pytest.mark.parametrize("glob", BAD_CLASSES)
def test_invalid_character_class_is_rd005_at_parse_time(glob: str):
    d = only_diagnostic(f"all l2 1\nlayer {glob}, fc l2 1\n")
    assert (d.code, d.line, d.column, d.end_column) == ("RD005", 2, 7, 7 + len(glob))
    with pytest.raises(GlobError):
        glob_regex(glob)


@pytest.mark.parametrize("glob", BAD_CLASSES)
def test_invalid_class_never_reaches_check_model_or_explain(tmp_path: Path, glob: str):
    path = write(tmp_path, f"layer {glob} l2 1\n")
    model = ["--model", "torch.nn:Linear", "--model-arg", "in_features=2", "--model-arg", "out_features=2"]
    for command in (["check", str(path), *model], ["explain", str(path), *model]):
        code, out = cli(*command)
        assert code == 1 and "RD005" in out and "Traceback" not in out, out


@pytest.mark.parametrize(
    ("glob", "matches", "misses"),
    [
        ("[]a]", ["]", "a"], ["b", "[]a]"]),
        ("[!]]", ["a", "["], ["]", "."]),
        ("[!-a]", ["b", "Z", "0"], ["-", "a", "."]),  # '-' first is itself, never a range with the '.'
        ("[a-]", ["a", "-"], ["b"]),
        ("[-a]", ["a", "-"], ["b"]),
        ("[a-c-e]", ["b", "-", "e"], ["d"]),
        ("[!0-3]", ["4", "x"], ["2", "."]),
        ("[+-/]", ["+", "-", "/"], ["."]),  # a range that spans '.' still never matches it
        ("[[]", ["["], ["]"]),
        ("x[*?]", ["x*", "x?"], ["xa"]),
        ("[\\]", ["\\"], ["]"]),
    ],
)
def test_character_classes(glob: str, matches: list[str], misses: list[str]):
    regex = glob_regex(glob)
    assert [m for m in matches if not regex.fullmatch(m)] == []
    assert [m for m in misses if regex.fullmatch(m)] == []
    regdsl.parse(f'layer "{glob}" l2 1')  # what compiles validates


@SETTINGS
@given(st.text(alphabet="ab.[]!-*?\\", max_size=8))
def test_every_glob_that_parses_compiles_and_selects(glob: str):
    try:
        spec = regdsl.parse(f'layer "{glob}" l2 1')
    except RegValidationError as err:
        assert [d.code for d in err.diagnostics] == ["RD005"]
        with pytest.raises(GlobError):
            glob_regex(glob)
        return
    from regdsl.select import ParamTable
    from regdsl.select import glob_regex as selects_with

    assert selects_with is glob_regex  # one compiler for validation and selection
    import torch

    ParamTable(torch.nn.Linear(1, 1)).select(spec.statements[0].selector)


def test_validation_needs_neither_torch_nor_select():
    code = (
        "import sys, regdsl; regdsl.parse('layer [!]a].x[0-3] l2 1; type *Norm none');"
        "assert 'torch' not in sys.modules and 'regdsl.select' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- error recovery


def _reparse_oracle(text: str):
    """The old recovery, quadratic but plainly right: blank the bad statement, parse the whole file again."""
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
    work, diagnostics = text, []
    for _ in range(len(text) + 2):
        try:
            return parser._lark().parse(work), diagnostics
        except UnexpectedInput as exc:
            diag, offset = parser._diagnose(exc, work, (0, 1, 1), text, starts, "<string>")
            diagnostics.append(diag)
            line_start = work.rfind("\n", 0, offset) + 1
            line_end = work.find("\n", line_start)
            line_end = len(work) if line_end == -1 else line_end
            segments, _ = parser.split_line(work[line_start:line_end])
            # An error on a separator or past the end belongs to the statement before it.
            start, end = next(
                (line_start + a, line_start + b)
                for a, b in segments
                if a <= offset - line_start <= b or (a, b) == segments[-1]
            )
            work = work[:start] + "".join(c if c == "\n" else " " for c in work[start:end]) + work[end:]
    raise AssertionError("no progress")


def _positions(node):
    """A tree as nested tuples with every position, since lark's == ignores them."""
    if isinstance(node, lark.Token):
        return (
            node.type,
            str(node),
            node.start_pos,
            node.end_pos,
            node.line,
            node.column,
            node.end_line,
            node.end_column,
        )
    meta = node.meta
    where = () if meta.empty else (meta.line, meta.column, meta.end_line, meta.end_column, meta.start_pos, meta.end_pos)
    return (str(node.data), where, tuple(_positions(c) for c in node.children))


STATEMENTS = [
    "all l2 1", "layer fc2.* l1 1e-4 prox warmup 3", 'layer "a;b#c" l2 1', "exclude bias", "type Linear none",
    "all l3 1", "all", "layer", "l2 1", "all l2", "all l2 1 l2", "layer a, l2 1", "all @", 'layer "open', "exclude",
    "all decay 1 warmup", "all max_norm 1 warmup 3", "layer x@y l2 1", "all l2 1 cosine to", "\ufeff", "\x00", "1.2.3",
    "", " ", "\t", "# comment", "all l2 1 # c", "all\r",
]  # fmt: skip
SEPARATORS = ["\n", "\r\n", ";", " ; ", "\n\n", "# c\n"]
statement_files = st.lists(st.tuples(st.sampled_from(STATEMENTS), st.sampled_from(SEPARATORS)), max_size=12).map(
    lambda parts: "".join(s + e for s, e in parts)
)


@SETTINGS
@given(statement_files, st.sampled_from(["", "all", "layer x l2", "all l2 1 # end", ";"]))
@example("all\nall l3\nlayer x l2 1; all; exclude", "")
@example('layer "x; all l3 1\nall l2 1', "")
def test_recovery_reports_what_reparsing_the_whole_file_reports(body: str, tail: str):
    text = body + tail
    tree, diagnostics = parser.parse_tree(text)
    expected_tree, expected = _reparse_oracle(text)
    assert diagnostics == expected
    # The statements, positions included (the root's own span is used by nothing).
    assert [_positions(c) for c in tree.children] == [_positions(c) for c in expected_tree.children]


class _Work:
    """Tokens lexed and characters handed to lark while parsing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.tokens = self.chars = 0
        real_lark, real_feed = parser._lark(), lark.lexer.LineCounter.feed
        work = self

        class Counting:
            def __getattr__(self, name):
                return getattr(real_lark, name)

            def parse(self, text):
                work.chars += len(text)
                return real_lark.parse(text)

        def feed(line_counter, token, test_newline=True):
            work.tokens += 1
            return real_feed(line_counter, token, test_newline)

        monkeypatch.setattr(parser, "_lark", Counting)
        monkeypatch.setattr(lark.lexer.LineCounter, "feed", feed)

    def of(self, text: str) -> tuple[int, int]:
        self.tokens = self.chars = 0
        with pytest.raises(RegSyntaxError):
            regdsl.parse(text)
        return self.tokens, self.chars


@pytest.mark.parametrize(
    "make",
    [
        lambda n: "all l3 1\n" * n,  # every line bad
        lambda n: "all l2 1\n" * n + "all l3 1\nall l2 1\n" * n,  # good lines, then bad ones between good ones
        lambda n: "all;" * n,  # many bad statements on one line
        lambda n: "all l2 1; all\n" * n,  # a good statement before each bad one
    ],
    ids=["bad-lines", "good-then-alternating", "one-line", "good-before-bad"],
)
def test_recovery_work_grows_linearly(monkeypatch: pytest.MonkeyPatch, make):
    work = _Work(monkeypatch)
    small, large = work.of(make(200)), work.of(make(400))
    # Twice the file, about twice the work; the reparsing recovery did four times.
    assert large[0] <= 2.2 * small[0], (small, large)
    assert large[1] <= 2.2 * small[1], (small, large)


def test_valid_file_is_one_pass(monkeypatch: pytest.MonkeyPatch):
    work = _Work(monkeypatch)
    text = "all l2 1; exclude bias # c\n" * 100
    work.tokens = work.chars = 0
    regdsl.parse(text)
    assert work.chars == len(text)


def test_recovery_positions_after_errors():
    text = "all l3 1; layer a l2 -1\n\tall; exclude layer x[]\r\nlayer ok l2 1; all\n"
    with pytest.raises(RegSyntaxError) as info:
        regdsl.parse(text)
    got = [(d.line, d.column, d.code) for d in info.value.diagnostics]
    assert got == [(1, 5, "RD001"), (1, 22, "RD004"), (2, 5, "RD001"), (2, 21, "RD005"), (3, 19, "RD001")]


def test_lone_cr_in_a_comment_is_comment_text_and_later_lines_are_still_checked():
    # A comment runs to the line's end ('\n'): the lexer once ended it at '\r', an RD001 the docs did not explain.
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.parse("all l2 1 # x\ry\nall l2 -1\n")
    assert [(d.line, d.column, d.code) for d in info.value.diagnostics] == [(2, 8, "RD004")]
    # Before a '\n' it is still the CRLF line end, and 'all l1 1' a statement of the next line.
    assert regdsl.parse("all l2 1 # x\r\r\nall l1 1\r\n") == regdsl.parse("all l2 1\nall l1 1")


def test_lone_cr_in_a_quoted_pattern_is_named_and_never_drawn():
    with pytest.raises(RegSyntaxError) as info:
        regdsl.parse('layer "a\rb" l2 1\n', "f.reg")
    (diagnostic,) = info.value.diagnostics
    assert "carriage return" in diagnostic.message, diagnostic.message
    # Printed raw, the '\r' would send the terminal back over 'layer "a'.
    assert "\r" not in str(info.value)
    assert str(info.value).split("\n")[1:] == ['layer "a b" l2 1', "      ^"]


# ---------------------------------------------------------------- one BOM rule


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("\ufeffall l2 1", True),
        ("\ufeff", True),
        ("\ufeff\ufeff", False),
        ("\ufeff\ufeffall l2 1", False),
        ("all\ufeff l2 1", False),
    ],
)
def test_bom_rule_is_the_same_for_parse_load_and_check(tmp_path: Path, text: str, ok: bool):
    path = write(tmp_path, text)
    outcomes = []
    for read in (lambda: regdsl.parse(text), lambda: regdsl.load(path)):
        try:
            read()
            outcomes.append(True)
        except RegSyntaxError as err:
            assert err.diagnostics[0].code == "RD001"
            outcomes.append(False)
    code, out = cli("check", str(path))
    assert outcomes == [ok, ok] and code == (0 if ok else 1), out


def test_fmt_drops_the_bom_and_positions_skip_it(tmp_path: Path):
    path = write(tmp_path, "\ufeffall l2 1 # c\n")
    assert cli("fmt", str(path))[0] == 0
    assert path.read_bytes() == b"all l2 1.0  # c\n"
    bad = write(tmp_path, "\ufeffall l3 1\n", "bad.reg")
    code, out = cli("check", str(bad))
    assert code == 1 and f"{bad}:1:5: error: RD001" in out and "\nall l3 1\n    ^^\n" in out


# ---------------------------------------------------------------- any text


ODD = [
    "\ufeff", "\x00", "\r\n", "\r", "\n", ";", "#", '"', "[", "]", "[]", "[!]", "[z-a]", " ", "\t", "\f", "\u2028",
    "\u00e9", "\U0001f600", "\x85", HUGE, "1" * 30, "0" * 4400 + "1", "-", "=", "e400", ".",
    "all", "layer", "type", "exclude", "l2", "l1", "decay", "warmup", "from", "until", "cosine to", "over", "dim=",
    "max_norm", "activity l1", "none", "prox", "to init", "fc.*", "**",
]  # fmt: skip
any_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(ODD), st.text(max_size=3)), max_size=16).map("".join),
    st.lists(st.sampled_from(ODD), max_size=16).map(" ".join),
)


@SETTINGS
@given(any_text)
@example("\ufeff\ufeff")
@example(f"all l1 1 warmup {HUGE}")
@example("layer [] l2 1")
@example("all l2 1\r\n\ufeffexclude bias")
def test_check_and_fmt_agree_with_parse_on_any_text(text: str):
    try:
        spec = regdsl.parse(text)
    except RegDslError:
        spec = None  # anything else escapes and fails the test
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), text)
        code, out = cli("check", str(path))
        assert code == (0 if spec is not None else 1), out
        code, out = cli("fmt", "--check", str(path))
        assert code in (0, 1) and "Traceback" not in out
        code, out = cli("fmt", str(path))
        assert code == (0 if spec is not None else 1), out
        if spec is not None:
            assert regdsl.load(path) == spec
