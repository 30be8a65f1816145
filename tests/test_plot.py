"""regdsl.plot.weights and `regdsl plot`: the figure's files are decoded and checked panel by
panel (every axes has drawn pixels), never looked at by eye; values behind the panels are checked
against numbers written out here."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import torch
from matplotlib.image import imread
from models import CNN, seeded

import regdsl
from regdsl.cli import main as cli
from regdsl.plot import PlotError, weights

ROOT = Path(__file__).resolve().parents[1]
RULES = "all decay 0.01\nexclude bias\nexclude norm\nlayer conv2.weight group_lasso 0.1\nlayer head.weight l1 0.1 prox"


def checkpoints() -> list[dict[str, torch.Tensor]]:
    """Three states: the initial one, then conv2's first filter and half of head.weight zeroed,
    then the weights shrunk too: what training with these rules would do, made by hand."""
    seeded(0)
    first = {k: v.clone() for k, v in CNN().state_dict().items()}
    middle = {k: v.clone() for k, v in first.items()}
    middle["conv2.weight"][0] = 0
    middle["head.weight"].view(-1)[::2] = 0
    last = {k: v * 0.5 for k, v in middle.items()}
    return [first, middle, last]


def panels_drawn(fig, path: Path) -> list[float]:
    """Per axes, the fraction of its pixels (inside the frame) that are not white, read back from the file."""
    image = imread(path)
    height, width = image.shape[:2]
    assert (width, height) == (round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100))
    fractions = []
    for ax in fig.axes:
        box = ax.get_window_extent()
        x0, x1 = int(box.x0) + 3, int(box.x1) - 3
        y0, y1 = height - int(box.y1) + 3, height - int(box.y0) - 3  # image rows count from the top
        inside = image[y0:y1, x0:x1, :3]
        fractions.append(float((inside < 0.95).any(axis=-1).mean()))
    return fractions


def test_every_panel_is_drawn(tmp_path: Path) -> None:
    seeded(0)
    path = tmp_path / "w.png"
    fig = weights(regdsl.parse(RULES), CNN(), checkpoints(), path=path, labels=["init", "mid", "end"])
    groups = [g.name for g in regdsl.resolve(regdsl.parse(RULES), CNN()).groups_summary() if g.params]
    # A histogram per group, then the sparsity panel, then the norms.
    assert len(fig.axes) == len(groups) + 2
    assert [ax.get_title().split(" (")[0] for ax in fig.axes[: len(groups)]] == groups
    fractions = panels_drawn(fig, path)
    assert all(f > 0.02 for f in fractions), fractions


def test_the_panels_hold_the_numbers(tmp_path: Path) -> None:
    seeded(0)
    states = checkpoints()
    fig = weights(regdsl.parse(RULES), CNN(), states)
    sparsity = fig.axes[-2]
    names = [t.get_text() for t in sparsity.get_xticklabels()]
    assert names == ["conv2.weight", "head.weight"]
    heights = [p.get_height() for p in sparsity.patches]
    # First checkpoint: no zeros; last: conv2's first of 8 filters, head.weight every other element.
    head = states[-1]["head.weight"]
    assert heights == pytest.approx([0.0, 0.0, 1 / 8, (head == 0).float().mean().item()])
    norms = fig.axes[-1]
    decay = next(line for line in norms.get_lines() if line.get_label() == "decay=0.01")
    members = ("conv1.weight", "conv2.weight", "head.weight")  # the weights: biases and BatchNorm excluded
    expected = [torch.cat([s[n].flatten() for n in members]).norm().item() for s in states]
    assert list(decay.get_ydata()) == pytest.approx(expected)


@pytest.mark.parametrize("extension", ["eps", "ps"])
def test_postscript_gets_outlined_histograms_and_no_transparency_warning(
    tmp_path: Path, extension: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostScript has no transparency: half-transparent bars and legend frames drew matplotlib's warning
    # (logged, not a Python warning), and the last checkpoint's bars hid the first's.
    seeded(0)
    path = tmp_path / f"w.{extension}"
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("error")
        fig = weights(regdsl.parse(RULES), CNN(), checkpoints(), path=path)
    assert not [r.getMessage() for r in caplog.records if "transparency" in r.getMessage()]
    assert path.read_bytes().startswith(b"%!PS")
    bars = [patch for patch in fig.axes[0].patches]
    assert len(bars) == 2 and all(bar.get_alpha() is None and not bar.get_fill() for bar in bars)
    png = weights(regdsl.parse(RULES), CNN(), checkpoints())
    assert all(bar.get_alpha() == 0.5 and bar.get_fill() for bar in png.axes[0].patches)


def test_two_checkpoints_are_before_and_after(tmp_path: Path) -> None:
    seeded(0)
    states = checkpoints()
    fig = weights(regdsl.parse(RULES), CNN(), [states[0], states[-1]])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["before", "after"]


def test_a_checkpoint_without_a_tensor_is_an_error() -> None:
    seeded(0)
    state = checkpoints()[0]
    del state["head.weight"]
    with pytest.raises(PlotError, match="has no tensor 'head.weight'"):
        weights(regdsl.parse(RULES), CNN(), [state])


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda s: s.update({"conv2.weight": s["conv2.weight"][:3]}), "'conv2.weight' has shape 3x"),  # another model's
        (lambda s: s["head.weight"].view(-1).__setitem__(0, float("nan")), "'head.weight' holds NaN or infinite values"),
        (lambda s: s.update({"fc.weight" if "fc.weight" in s else "head.weight": s["head.weight"].to(torch.complex64)}), "complex64 tensor"),
    ],
    ids=["shape", "nan", "complex"],
)
def test_a_checkpoint_the_figure_cannot_show_is_refused_naming_the_tensor(change, says: str) -> None:
    # Before: a checkpoint of another model drew a believable picture, a NaN an empty histogram, a complex
    # tensor its real part (with torch's warning).
    state = checkpoints()[0]
    change(state)
    with pytest.raises(PlotError, match=says):
        weights(regdsl.parse(RULES), CNN(), [checkpoints()[0], state])


def test_a_group_of_zero_element_tensors_is_drawn_empty(tmp_path: Path) -> None:
    # Before: a raw RuntimeError from min() of an empty tensor.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        model = torch.nn.Sequential(torch.nn.Linear(0, 4), torch.nn.Linear(4, 2))
    fig = weights(regdsl.parse("all decay 0.1\nlayer 0.weight decay 0.5\n"), model, [model.state_dict()], tmp_path / "z.png")
    assert "no elements" in [t.get_text() for ax in fig.axes for t in ax.texts]


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.reg"
    rules.write_text(RULES, encoding="utf-8")
    files = []
    for i, state in enumerate(checkpoints()):
        files.append(tmp_path / f"{i}.pt")
        torch.save({"model": state}, files[-1])
    out = tmp_path / "out.png"
    target = f"{ROOT / 'tests' / 'models.py'}:CNN"
    assert cli(["plot", str(rules), "--model", target, "--checkpoint", *map(str, files), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    image = imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    torch.save({"model": {}}, files[0])
    assert cli(["plot", str(rules), "--model", target, "--checkpoint", str(files[0]), "-o", str(out)]) == 2
    assert "has no tensor" in capsys.readouterr().err


def test_the_installed_command(tmp_path: Path) -> None:
    """Through the entry point, as users run it: no warnings on stderr."""
    from support import entry_point

    rules = tmp_path / "rules.reg"
    rules.write_text(RULES, encoding="utf-8")
    torch.save(checkpoints()[0], tmp_path / "a.pt")
    torch.save(checkpoints()[-1], tmp_path / "b.pt")
    done = subprocess.run(
        [*entry_point(), "plot", str(rules), "--model", f"{ROOT / 'tests' / 'models.py'}:CNN",
         "--checkpoint", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "-o", str(tmp_path / "c.png")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert imread(tmp_path / "c.png").shape[2] in (3, 4)


# ---------------------------------------------------------------- what the command refuses


def plot(tmp_path: Path, *checkpoint: str, output: str = "out.png", rules: str = RULES, target: str | None = None) -> int:
    """`regdsl plot` on RULES (or ``rules``) and tests/models.py's CNN, from ``tmp_path``'s files."""
    (tmp_path / "rules.reg").write_text(rules, encoding="utf-8")
    model = target or f"{ROOT / 'tests' / 'models.py'}:CNN"
    paths = [str(tmp_path / c) for c in checkpoint]
    return cli(["plot", str(tmp_path / "rules.reg"), "--model", model, "--checkpoint", *paths, "-o", str(tmp_path / output)])


def test_a_checkpoint_with_objects_is_refused_saying_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A training checkpoint with an argparse.Namespace in it: torch.load(weights_only=True) refuses
    it, and plot says so (never loads it as a pickle, which runs code) and what to save instead."""
    import argparse

    torch.save({"model": checkpoints()[0], "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    assert plot(tmp_path, "ns.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"regdsl: error: cannot read checkpoint {tmp_path / 'ns.pt'}: it holds argparse.Namespace")
    assert "weights_only=True" in err and "can run code" in err and "torch.save(model.state_dict(), path)" in err
    assert err.count("\n") == 1 and not (tmp_path / "out.png").exists()
    with pytest.raises(PlotError, match="it holds argparse.Namespace"):
        weights(regdsl.parse(RULES), CNN(), [tmp_path / "ns.pt"])


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "the file is empty"), (b"hello\n", "not a file torch.save wrote"), (b"PK\x03\x04truncated", "PytorchStreamReader")],
    ids=["empty", "text", "truncated-zip"],
)
def test_a_file_that_is_no_checkpoint_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, why: str
) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    assert plot(tmp_path, "bad.pt") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"regdsl: error: cannot read checkpoint {tmp_path / 'bad.pt'}: ") and why in err


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("nodir/w.png", "cannot write {out}: no directory {tmp}/nodir"),
        ("w.xyz", "cannot write {out}: matplotlib writes no format '.xyz'; end the name with one of: "),
        ("weights", "cannot write {out}: the name has no extension to tell the image format; end it with one of: "),
        ("adir", "cannot write {out}: it is a directory"),
    ],
    ids=["missing-directory", "unknown-format", "no-extension", "a-directory"],
)
def test_the_output_is_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str, why: str
) -> None:
    """Before the model is built or a checkpoint read (missing.pt does not exist); matplotlib would
    have found out after the work, or written weights.png for -o weights and adir.png for -o adir."""
    (tmp_path / "adir").mkdir()
    assert plot(tmp_path, "missing.pt", output=output, target="no_such_module:Model") == 2
    err = capsys.readouterr().err
    assert err.startswith("regdsl: error: " + why.format(out=tmp_path / output, tmp=tmp_path)), err
    assert err.count("\n") == 1
    if "one of" in why:
        assert "pdf, pgf, png" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "rules.reg"]


def test_the_output_is_the_path_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The format comes from the extension, whatever its case; the file written is the one named."""
    torch.save(checkpoints()[0], tmp_path / "a.pt")
    assert plot(tmp_path, "a.pt", output="w.SVG") == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'w.SVG'}\n"
    assert (tmp_path / "w.SVG").read_bytes().lstrip().startswith(b"<?xml")


@pytest.mark.parametrize(
    ("rules", "target", "code"),
    [(RULES + "\nlayer hed.** l1 0.1", None, "RD101 layer pattern 'hed.**' matches no parameter"), (RULES, "torch.nn:ReLU", "RD107")],
    ids=["pattern-typo", "no-parameters"],
)
def test_a_file_compile_refuses_is_not_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: str, target: str | None, code: str
) -> None:
    """As explain: the errors on stderr and exit 1 (the picture would show rules no run can have)."""
    torch.save(checkpoints()[0] if target is None else {}, tmp_path / "a.pt")
    assert plot(tmp_path, "a.pt", rules=rules, target=target) == 1
    out, err = capsys.readouterr()
    assert out == "" and code in err
    assert err.endswith("compile refuses this file: 1 error (regdsl check shows every finding)\n")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("error", "why"),
    [(OSError(28, "No space left on device"), "No space left on device"), (RuntimeError("'xelatex' not found"), "'xelatex' not found")],
    ids=["full-disk", "no-latex-for-pgf"],
)
def test_a_failed_write_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, error: Exception, why: str
) -> None:
    """What output_format cannot see before: the disk filling up, a .pgf without LaTeX installed."""
    from matplotlib.figure import Figure

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(Figure, "savefig", fail)
    torch.save(checkpoints()[0], tmp_path / "a.pt")
    assert plot(tmp_path, "a.pt") == 2
    assert capsys.readouterr().err == f"regdsl: error: cannot write {tmp_path / 'out.png'}: {why}\n"
