"""A diagnostic on a long line shows a window of it around the caret: each diagnostic repeats its
source line, so a generated one-line file of 20,000 rules printed 10 GB where its messages are MB."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from support import entry_point

import regdsl
from regdsl.errors import SHOWN, Diagnostic

ROOT = Path(__file__).resolve().parent.parent


@given(
    text=st.text(alphabet="abc ;\t.", min_size=1, max_size=600),
    at=st.floats(0, 1),
    width=st.integers(1, 40),
)
def test_the_caret_stays_under_the_characters_it_points_at(text: str, at: float, width: int) -> None:
    column = 1 + int(at * (len(text) - 1))
    d = Diagnostic(line=1, column=column, end_line=1, end_column=column + width, message="m", source_line=text)
    _, shown, caret = d.render().split("\n")
    assert len(shown) <= SHOWN + 6
    if len(text) <= SHOWN:
        assert shown == text
    first = len(caret) - len(caret.lstrip(" \t"))
    marked = caret.count("^")
    # Under the caret, exactly the characters the diagnostic points at (as many as fit in the window).
    assert shown[first : first + marked] == text[column - 1 : column - 1 + marked]
    assert marked == width or first + marked == len(shown) - 3 * shown.endswith("...")
    assert caret[:first] == "".join("\t" if c == "\t" else " " for c in shown[:first])


def test_a_one_line_file_of_many_rules_prints_in_proportion(tmp_path: Path) -> None:
    rules = tmp_path / "one.reg"
    rules.write_text("".join(f"layer x{k} l2 1; " for k in range(2000)) + "\n")
    done = subprocess.run(
        [*entry_point(), "check", str(rules), "--model", "examples/train.py:Classifier"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout.count("error: RD101") == 2000, done.stderr
    assert len(done.stdout) < 2000 * 600  # before: 2,000 copies of a 34,000-character line, 130 MB
    assert max(len(line) for line in done.stdout.splitlines() if not line.startswith(str(rules))) <= SHOWN + 6


def test_a_long_pattern_is_cut_in_the_message_too() -> None:
    # Before, the RD101 message held the 100,000-character pattern whole, above a source line cut to 160.
    pattern = ".".join(["a"] * 50_000)
    (d,) = regdsl.check(regdsl.parse(f"layer {pattern} l2 1\n"), torch.nn.Linear(2, 2))
    assert d.code == "RD101" and len(d.message) < 400
    assert f"'{pattern[:80]}...{pattern[-80:]}'" in d.message
