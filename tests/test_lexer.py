"""The Pygments lexer and the TextMate grammar (regdsl/lexer.py) tokenize every rule file in the
repository, examples and golden files included, with no error token, and classify every keyword
of the parser's tables as its kind; the committed TextMate file is the one the module writes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pygments = pytest.importorskip("pygments")

from pygments.token import Error, Keyword, Name, Number

import regdsl
from regdsl import lexer
from regdsl.parser import KEYWORDS, KEYWORDS_SELECTOR, KEYWORDS_TERM

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted({*ROOT.glob("examples/*.reg"), *ROOT.glob("tests/data/**/*.reg")})


def test_there_are_files_to_read() -> None:
    assert len(FILES) > 50


def lexical_errors(text: str) -> set[tuple[int, int]]:
    """Where the parser itself stops at a character no token can start with (a stray '@', an
    unterminated quote): the only places a highlighter may mark an error."""
    try:
        regdsl.parse(text)
    except regdsl.RegDslError as error:
        lexical = ("unexpected character", "unterminated quoted pattern")
        return {(d.line, d.column) for d in error.diagnostics if any(m in d.message for m in lexical)}
    return set()


def positions(tokens: list[tuple[object, str]], wanted) -> set[tuple[int, int]]:
    out, line, column = set(), 1, 1
    for kind, value in tokens:
        if wanted(kind):
            out.add((line, column))
        for char in value:
            line, column = (line + 1, 1) if char == "\n" else (line, column + 1)
    return out


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_pygments_marks_errors_only_where_the_parser_does(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    tokens = list(lexer.RegDslLexer().get_tokens(text))
    assert positions(tokens, lambda kind: kind in Error) == lexical_errors(text)
    assert "".join(value for _, value in tokens).rstrip("\n") == text.rstrip("\n")


def test_pygments_classifies_each_kind() -> None:
    tokens = [(k, v) for k, v in lexer.RegDslLexer().get_tokens("layer fc2.* l2 0.01 warmup 100 # why\nexclude bias") if v.strip()]
    assert tokens == [
        (Name.Builtin, "layer"), (Name, "fc2.*"), (Keyword, "l2"), (Number, "0.01"), (Keyword.Pseudo, "warmup"),
        (Number, "100"), (pygments.token.Comment.Single, "# why"), (Keyword.Declaration, "exclude"), (Name.Builtin, "bias"),
    ]  # fmt: skip
    # Whole words only, as the grammar has them: `l21` and `biased` are names, `norm.weight` a pattern.
    for word in ("l21", "biased", "norm.weight", "decay_rate"):
        assert [k for k, v in lexer.RegDslLexer().get_tokens(word) if v.strip()] == [Name], word


def test_a_comment_runs_to_the_line_end_through_a_lone_cr_as_the_parser_reads_it() -> None:
    # TextMate only: Pygments turns every '\r' into '\n' before any rule sees the text.
    assert [(n, v) for n, v in textmate_scan("all # a\rb") if n.startswith("comment")] == [
        ("comment.line.number-sign.regdsl", "# a\rb")
    ]


@pytest.mark.parametrize("word", KEYWORDS)
def test_every_keyword_of_the_parser_is_highlighted(word: str) -> None:
    (kind,) = [k for k, v in lexer.RegDslLexer().get_tokens(word) if v.strip()]
    assert kind is not Name and kind not in Error
    if word in KEYWORDS_TERM:
        assert kind is Keyword
    if word in KEYWORDS_SELECTOR:
        assert kind is Name.Builtin


def test_pygmentize_finds_the_lexer_through_its_entry_point(tmp_path: Path) -> None:
    from support import entry_point

    script = Path(entry_point()[0]).with_name("pygmentize")
    if not script.exists():
        pytest.skip("pygmentize is not installed beside this interpreter")
    rules = tmp_path / "rules.reg"
    rules.write_text("layer fc2.* l2 0.01\n", encoding="utf-8")
    done = subprocess.run([str(script), "-l", "regdsl", "-f", "html", str(rules)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert '<span class="k">l2</span>' in done.stdout and '<span class="nb">layer</span>' in done.stdout


def test_the_committed_textmate_grammar_is_the_generated_one() -> None:
    committed = json.loads((ROOT / "editors" / "regdsl.tmLanguage.json").read_text(encoding="utf-8"))
    assert committed == lexer.textmate(), "regenerate it: python -m regdsl.lexer > editors/regdsl.tmLanguage.json"


def textmate_scan(line: str) -> list[tuple[str, str]]:
    """A TextMate engine's first-match rule, for a grammar of single-line `match` patterns: at each
    position the first pattern that matches there wins; whitespace between tokens is skipped."""
    patterns = [(p["name"], re.compile(p["match"])) for p in lexer.textmate()["patterns"]]
    out, at = [], 0
    while at < len(line):
        if line[at].isspace():
            at += 1
            continue
        for name, pattern in patterns:
            found = pattern.match(line, at)
            if found and found.end() > at:
                out.append((name, found.group()))
                at = found.end()
                break
        else:
            out.append(("invalid", line[at]))
            at += 1
    return out


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_textmate_marks_errors_only_where_the_parser_does(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    found = set()
    for number, line in enumerate(text.split("\n"), start=1):
        at = 0
        for name, value in textmate_scan(line):
            at = line.index(value, at)
            if name == "invalid":
                found.add((number, at + 1))
            at += len(value)
    assert found == lexical_errors(text)


def test_textmate_classifies_each_kind() -> None:
    assert textmate_scan("layer fc2.* l2 0.01 warmup 100 # why") == [
        ("support.function.selector.regdsl", "layer"), ("entity.name.tag.pattern.regdsl", "fc2.*"),
        ("keyword.other.term.regdsl", "l2"), ("constant.numeric.regdsl", "0.01"),
        ("keyword.control.schedule.regdsl", "warmup"), ("constant.numeric.regdsl", "100"),
        ("comment.line.number-sign.regdsl", "# why"),
    ]  # fmt: skip
    assert textmate_scan("layer fc.l1 l21") == [
        ("support.function.selector.regdsl", "layer"), ("entity.name.tag.pattern.regdsl", "fc.l1"),
        ("entity.name.tag.pattern.regdsl", "l21"),
    ]  # fmt: skip
