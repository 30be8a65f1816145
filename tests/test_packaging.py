"""The built wheel carries the grammar and works outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("build")
pytest.importorskip("hatchling")


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_parses(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = dist.glob("regdsl-*.whl")
    import zipfile

    assert "regdsl/_grammar/regdsl.lark" in zipfile.ZipFile(wheel).namelist()

    # The venv borrows torch, pydantic and lark from this interpreter, so nothing is
    # downloaded; regdsl itself comes only from the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    rules = tmp_path / "rules.reg"
    rules.write_text("layer fc2.* l2 0.01; exclude bias\n", encoding="utf-8")
    probe = (
        "import sys, regdsl, regdsl.parser as p\n"
        f"spec = regdsl.load({str(rules)!r})\n"
        "print(regdsl.__file__)\n"
        "print(p.grammar_text() == open(regdsl.__file__.rsplit('/', 1)[0] + '/_grammar/regdsl.lark').read())\n"
        "print(spec.to_source(), end='')\n"
    )
    # Run from an empty directory so the source checkout cannot be imported by accident.
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    location, grammar_from_wheel, *source = result.stdout.splitlines()
    assert Path(location).is_relative_to(env_dir), location
    assert grammar_from_wheel == "True"
    assert source == ["layer fc2.* l2 0.01", "exclude bias"]
    # The entry point is installed too.
    check = subprocess.run(
        [str(env_dir / "bin" / "regdsl"), "check", str(rules)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
