"""The built wheel carries the grammar and works outside the source tree."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
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

    # The venv borrows torch, pydantic and lark from the environment running this test, so
    # nothing is downloaded. `system_site_packages=True` would not do: it exposes the *base*
    # interpreter's packages, and on a fresh machine those are only in the outer venv (.ci/run).
    # A .pth file lists the running interpreter's site-packages directories instead. Python adds
    # a .pth line to sys.path as is, without reading the .pth files inside it, so the outer
    # environment's editable regdsl (a .pth pointing at the checkout) cannot come along. It is
    # written after pip has installed the wheel, so pip sees an empty environment and never
    # mistakes the outer regdsl for one to replace.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE")}
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300, env=clean_env,
    )
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True, timeout=60, env=clean_env,
    ).stdout.strip()
    borrowed = "".join(f"{d}\n" for d in _site_dirs())
    (Path(venv_site) / "_borrowed_from_test_env.pth").write_text(borrowed, encoding="utf-8")
    rules = tmp_path / "rules.reg"
    rules.write_text("layer fc2.* l2 0.01; exclude bias\n", encoding="utf-8")
    probe = (
        "import sys, regdsl, regdsl.parser as p\n"
        f"spec = regdsl.load({str(rules)!r})\n"
        "print(regdsl.__file__)\n"
        "import json; print(json.dumps(sys.path))\n"
        "print(p.grammar_text() == open(regdsl.__file__.rsplit('/', 1)[0] + '/_grammar/regdsl.lark').read())\n"
        "print(spec.to_source(), end='')\n"
    )
    # Run from an empty directory so the source checkout cannot be imported by accident.
    result = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False, env=clean_env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no warning either (torch's NumPy one included)
    location, path, grammar_from_wheel, *source = result.stdout.splitlines()
    assert Path(location).is_relative_to(env_dir), location
    # The outer venv may live inside the checkout (.ci/run's .venv); only the checkout itself
    # on sys.path would make the source tree's regdsl importable.
    assert ROOT not in {Path(entry or tmp_path).resolve() for entry in json.loads(path)}, path
    assert grammar_from_wheel == "True"
    assert source == ["layer fc2.* l2 0.01", "exclude bias"]
    # The entry point is installed too.
    check = subprocess.run(
        [str(env_dir / "bin" / "regdsl"), "check", str(rules)],
        cwd=tmp_path, capture_output=True, text=True, check=False, env=clean_env,
    )
    assert check.returncode == 0, check.stderr


def _site_dirs() -> list[Path]:
    """Where this interpreter's installed packages are: its site-packages (a venv with system site
    packages lists the base ones too), plus purelib and platlib in case site was not run."""
    dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    unique: dict[Path, None] = {}
    for d in dirs:
        path = Path(d)
        if path.is_dir():
            unique.setdefault(path.resolve(), None)
    return list(unique)
