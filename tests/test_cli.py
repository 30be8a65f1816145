"""The installed ``regdsl`` entry point, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import entry_point


def run(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "regdsl"] if module else entry_point()
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.reg"
    path.write_text("layer fc2.* l2 0.01; exclude bias\nall decay 0.05\n", encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.reg"
    path.write_text("all decay 0.05\nlayer fc2.* l3 0.01\nall l2 -1\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("module", [False, True], ids=["entry-point", "python-m"])
def test_valid_file_exits_0_with_one_line_summary(good: Path, module: bool) -> None:
    result = run("check", str(good), module=module)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "1 file" in lines[0] and "3 statements" in lines[0]


def test_invalid_file_exits_1_listing_every_problem_with_caret(bad: Path) -> None:
    result = run("check", str(bad))
    assert result.returncode == 1
    out = result.stdout.splitlines()
    # Both problems, in file order, each as path:line:col: error: ..., source line, caret.
    first = out.index(next(l for l in out if l.startswith(f"{bad}:2:13: error: ")))
    assert "did you mean 'l2'?" in out[first]
    assert out[first + 1] == "layer fc2.* l3 0.01"
    assert out[first + 2] == " " * 12 + "^^"
    second = out.index(next(l for l in out if l.startswith(f"{bad}:3:")))
    assert second > first
    assert "strength must be >= 0" in out[second]
    assert out[second + 1] == "all l2 -1"
    assert out[second + 2].rstrip().endswith("^")
    assert "2 errors" in out[-1]


def test_several_files_one_bad(good: Path, bad: Path) -> None:
    result = run("check", str(good), str(bad))
    assert result.returncode == 1
    assert str(good) not in result.stdout
    assert str(bad) in result.stdout


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "missing.reg"))
    assert result.returncode == 2
    assert "missing.reg" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreadable_file_among_several_leaves_nothing_half_done(tmp_path: Path) -> None:
    """check and fmt read every file first: no report printed for the files before the missing one,
    and no file formatted, not even those before it."""
    bad, messy = tmp_path / "bad.reg", tmp_path / "messy.reg"
    bad.write_text("all l3 1\n", encoding="utf-8")
    messy.write_text("all   l2 1;exclude bias\n", encoding="utf-8")
    missing = str(tmp_path / "missing.reg")
    result = run("check", "--format", "json", str(bad), missing, str(messy))
    assert (result.returncode, result.stdout) == (2, "")
    assert "missing.reg" in result.stderr and "Traceback" not in result.stderr
    result = run("fmt", str(messy), missing)
    assert result.returncode == 2 and "missing.reg" in result.stderr
    assert messy.read_text(encoding="utf-8") == "all   l2 1;exclude bias\n"


def test_fmt_with_a_file_it_cannot_write_leaves_every_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second file opens for reading only (as a read-only or immutable file does for a user):
    a usage error naming it, and the first, formattable too, is not rewritten."""
    import builtins

    from regdsl import cli

    first, locked = tmp_path / "first.reg", tmp_path / "locked.reg"
    for path in (first, locked):
        path.write_text("all   l2 1\n", encoding="utf-8")
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file) == str(locked) and any(c in mode for c in "wa+"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    assert cli.main(["fmt", str(first), str(locked)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {locked}: Permission denied; no file was reformatted" in err, err
    monkeypatch.undo()
    assert first.read_text(encoding="utf-8") == locked.read_text(encoding="utf-8") == "all   l2 1\n"


def test_directory_is_unreadable_exit_2(tmp_path: Path) -> None:
    result = run("check", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2() -> None:
    assert run().returncode == 2
    assert run("check").returncode == 2
    assert run("frobnicate", "x.reg").returncode == 2


def test_non_utf8_file_is_a_positioned_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.reg"
    path.write_bytes(b"all decay 0.05\nlayer caf\xe9 l2 1\n")
    result = run("check", str(path))
    assert result.returncode == 1
    assert f"{path}:2:10: error:" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
