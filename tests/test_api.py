"""The public surface: what `import regdsl` gives and how it behaves at its edges."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regdsl
from regdsl.report import explain_records

ROOT = Path(__file__).resolve().parent.parent


def test_import_and_check_do_not_need_torch() -> None:
    # `regdsl check` on a file must stay fast: parsing alone never imports torch.
    code = "import sys, regdsl; regdsl.parse('all l2 1'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_compile_function_survives_the_compiler_module_being_loaded_first() -> None:
    # spec.compile() imports regdsl.compiler; regdsl.compile must still be the function.
    code = (
        "import torch, regdsl\n"
        "regdsl.parse('all l2 1').compile(torch.nn.Linear(2, 2))\n"
        "print(callable(regdsl.compile), regdsl.compile.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "regdsl.compiler"]


def test_compile_from_a_path_and_from_a_spec_agree(tmp_path: Path) -> None:
    path = tmp_path / "rules.reg"
    path.write_text("all decay 0.1\nexclude bias\n", encoding="utf-8")
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    from_path = regdsl.compile(path, model)
    from_str = regdsl.compile(str(path), model)
    from_spec = regdsl.compile(regdsl.load(path), model)
    decays = [[g["weight_decay"] for g in r.param_groups()] for r in (from_path, from_str, from_spec)]
    assert decays == [[0.1, 0.0]] * 3
    # The rows name the file the rule came from.
    row = from_path.explain()[0]
    assert row.terms["decay"].where == f"{path}:1"


def test_load_of_a_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        regdsl.load(tmp_path / "nope.reg")


def test_compile_of_rule_text_says_it_takes_a_path(tmp_path: Path) -> None:
    # A FileNotFoundError still (what an except clause around a path expects), that names the way to compile text.
    with pytest.raises(FileNotFoundError, match=r"regdsl\.parse\(text\)\.compile\(model\)") as caught:
        regdsl.compile("all l2 0.1", nn.Linear(2, 2))
    assert caught.value.filename == "all l2 0.1"
    with pytest.raises(FileNotFoundError) as caught:
        regdsl.compile(tmp_path / "nope.reg", nn.Linear(2, 2))
    assert caught.value.filename == str(tmp_path / "nope.reg")


def test_every_error_is_a_regdsl_error() -> None:
    for cls in (regdsl.RegSyntaxError, regdsl.RegValidationError, regdsl.RegCompileError, regdsl.RegUsageError):
        assert issubclass(cls, regdsl.RegDslError)


def test_compile_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        regdsl.parse("all l2 1").compile(torch.zeros(3))  # type: ignore[arg-type]


def test_example_trains_and_the_rules_change_the_head(tmp_path: Path) -> None:
    """The README's demo end to end: a .reg file on disk changes a training run."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py")], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("head.", "body."))}
    # rules.reg: line 3 'all decay 0.05', 4 'exclude bias', 5 'exclude norm', 6 'layer head.** decay 0.1 l1 1e-4'
    assert rows["head.weight"][-2:] == ["decay:6", "l1:6"]
    assert rows["head.bias"][-1] == "excluded:4"
    assert rows["body.1.weight"][-1] == "excluded:5"  # the first LayerNorm
    assert rows["body.0.weight"][-1] == "decay:3"
    line = next(l for l in out.splitlines() if "norm of head.weight" in l).split()
    with_rules, without = float(line[3]), float(line[6])
    # decay 0.05 plus l1/l2 on the head must leave it measurably smaller than the plain run.
    assert with_rules < 0.95 * without


def test_cnn_example_trains_and_each_term_shows(tmp_path: Path) -> None:
    """examples/cnn.reg on examples/train_cnn.py: every term it uses leaves its mark on the run."""
    picture = tmp_path / "weights.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_cnn.py"), "--plot", str(picture)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings
    out = result.stdout
    assert picture.stat().st_size > 10_000  # decoded and checked panel by panel in tests/test_plot.py

    def measured(label: str) -> tuple[float, float]:
        line = next(l for l in out.splitlines() if l.strip().startswith(label))
        numbers = re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", line[len(line) - len(line.lstrip()) + len(label):])
        return float(numbers[0]), float(numbers[1])

    # cnn.reg: group_lasso 3e-2 on conv2, l1 0.2 prox + max_norm 1 on head.weight, activity l1 on act2.
    assert measured("conv2 filters with norm < 0.05")[0] >= 1
    zeros, plain_zeros = measured("exact zeros in head.weight")
    assert zeros > 0 and plain_zeros == 0
    assert measured("largest head row norm")[0] <= 1.0 + 1e-6
    with_rules, without = measured("mean |activation| of act2")
    assert with_rules < without
    assert "(saved and restored at step 150)" in out
    assert "activity l1:8" in out  # the module table of explain


def test_example_reports_a_bad_rule_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.reg"
    bad.write_text("all decay 0.05\nlayer head.** l3 1\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train.py"), str(bad)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 1
    assert f"{bad}:2:15: error:" in result.stderr
    assert "Traceback" not in result.stderr


def _readme_sessions() -> list[tuple[str, str]]:
    """Each ``$ regdsl check|explain ...`` in README.md's code blocks, with the output printed under it."""
    blocks, current = [], None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    sessions: list[tuple[str, str]] = []
    for block in blocks:
        parts = re.split(r"^\$ (.*)\n", block, flags=re.MULTILINE)
        for command, output in zip(parts[1::2], parts[2::2]):
            if command.startswith(("regdsl check", "regdsl explain")):
                sessions.append((command, output.rstrip("\n")))
    return sessions


@pytest.mark.parametrize(("command", "shown"), _readme_sessions(), ids=lambda v: v if v.startswith("regdsl") else "")
def test_readme_shows_what_the_commands_print(command: str, shown: str) -> None:
    # The README is documentation of behaviour: an output it shows must be the output the code prints.
    if "tiny_gpt2" in command:
        pytest.importorskip("transformers")
    import shlex

    argv = shlex.split(command)[1:]
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from regdsl.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )
    assert (result.stdout + result.stderr).rstrip("\n") == shown


def test_strength_of_a_misspelt_kind_is_an_error_not_zero() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    reg = regdsl.parse("all l1 1e-3 decay 0.05\nlayer 1 activity l2 0.5\n").compile(model)
    assert (reg.strength("0.weight", "l1"), reg.strength("0.weight", "decay")) == (1e-3, 0.05)
    assert reg.strength("1", "activity_l2") == 0.5
    assert reg.strength("0.weight", "group_lasso") == 0.0  # a kind the rules do not set there
    for kind in ("L1", "weight_decay", "activity l2"):
        with pytest.raises(KeyError, match=rf"no term kind '{kind}': one of decay, l1, l2"):
            reg.strength("0.weight", kind)
    with pytest.raises(KeyError, match="no parameter named '0.wieght', nor a module with an activity term"):
        reg.strength("0.wieght", "l1")


def test_parse_takes_text_and_says_what_to_do_with_bytes() -> None:
    with pytest.raises(TypeError, match=r"parse\(\) takes the rule text as a str, not bytes: decode them first"):
        regdsl.parse(b"all l2 0.1")
    with pytest.raises(TypeError, match=r"not NoneType$"):
        regdsl.parse(None)  # type: ignore[arg-type]


def test_wrong_arguments_to_check_and_after_step_say_what_they_take() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"check\(\) takes a Spec \(regdsl.parse\(text\) or regdsl.load\(path\)\), not a str"):
        regdsl.check("all l2 1", model)  # type: ignore[arg-type]
    reg = regdsl.parse("all l2 0.1").compile(model)
    with pytest.raises(regdsl.RegUsageError, match="after_step\\(\\) takes the optimizer that just stepped, not a str"):
        reg.after_step("opt")  # type: ignore[arg-type]
    assert reg.step == 0


# ---------------------------------------------------------------- misuse met by an audit: clear errors


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (lambda m: regdsl.resolve("all l2 1", m), TypeError, "resolve() takes a Spec"),
        (lambda m: regdsl.resolve(m, regdsl.parse("all l2 1")), TypeError, "not a Sequential"),
        (lambda m: regdsl.format_explain(regdsl.compile(regdsl.parse("all l2 1"), m)), TypeError, "takes a list of ParamRow"),
        (lambda m: regdsl.format_groups(regdsl.compile(regdsl.parse("all l2 1"), m).explain()), TypeError, "takes a list of GroupSummary"),
        (lambda m: regdsl.compile(None, m), TypeError, "takes a .reg file's path or a Spec"),
        (lambda m: regdsl.compile(m, regdsl.parse("all l2 1")), TypeError, "not Sequential"),
        (lambda m: regdsl.load(3), TypeError, "load() takes a .reg file's path"),
        (lambda m: regdsl.parse("all l2 1", filename=3), TypeError, "filename"),
        (lambda m: regdsl.parse("all l2 uniform(0, 1) as a").with_values([("a", 0.5)]), TypeError, "takes a mapping"),
        (lambda m: regdsl.compile(regdsl.parse("layer 1 lr_mult 2"), m).param_groups(lr="x"), regdsl.RegUsageError, "takes a number"),
        (lambda m: regdsl.compile(regdsl.parse("layer 1 lr_mult 2"), m).param_groups(lr=True), regdsl.RegUsageError, "takes a number"),
        (
            lambda m: regdsl.compile(regdsl.parse("all l2 1"), m).attach(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)),
            regdsl.RegUsageError,
            "steps none of the parameters of the model",
        ),
        (
            lambda m: regdsl.compile(regdsl.parse("all l2 1"), m).attach(torch.optim.SGD(m.parameters(), lr=0.1), fold="yes"),
            regdsl.RegUsageError,
            "takes True or False",
        ),
        (
            lambda m: regdsl.parse("layer 1.* l2 0.01 to ref").compile(m, reference={"1.weight": torch.zeros(2, 8, device="meta"), "1.bias": torch.zeros(2)}),
            regdsl.RegCompileError,
            "on the meta device",
        ),
        # Found by an API audit: a raw TypeError/AttributeError from inside, a truthy "no" taken as
        # lr_scale=True, a corrupted optimizer state reaching dict().
        (lambda m: regdsl.format_explain(regdsl.compile(regdsl.parse("all l2 1"), m).explain(), None), TypeError, "takes a list of ModuleRow"),
        (lambda m: explain_records(regdsl.compile(regdsl.parse("all l2 1"), m).explain(), "x"), TypeError, "takes a list of ModuleRow"),
        (lambda m: regdsl.compile(regdsl.parse("layer 1 lr_mult 2"), m).param_groups(lr=0.1, lr_scale="no"), regdsl.RegUsageError, "takes True or False, not 'no'"),
        (lambda m: regdsl.Regularizer("all l2 1", m), TypeError, "takes a Spec and a torch.nn.Module, not str"),
        (lambda m: regdsl.compile(regdsl.parse("all l2 1"), m).param_groups(of=[]), regdsl.RegUsageError, "it was given none"),
        (
            lambda m: regdsl.compile(regdsl.parse("all l2 1"), m).remap_optimizer_state(
                {"state": {0: "x"}, "param_groups": [{"params": [0, 1, 2, 3], "name": "no_decay"}]},
                regdsl.compile(regdsl.parse("all l2 1"), m).state_dict(),
            ),
            regdsl.RegStateError,
            "needs an optimizer's state_dict()",
        ),
    ],
    ids=[
        "resolve-text", "resolve-swapped", "format-explain-reg", "format-groups-rows", "compile-none", "compile-swapped",
        "load-int", "parse-filename", "with-values-list", "lr-str", "lr-bool", "attach-other-model", "attach-fold-str",
        "meta-reference", "format-explain-modules", "explain-records-modules", "lr-scale-str", "regularizer-text", "of-empty", "remap-corrupt",
    ],
)
def test_misuse_is_a_clear_error(call, error: type, says: str) -> None:
    # Before each was a raw AttributeError/TypeError from deep inside, or (lr=True, another model's
    # optimizer, fold="yes") accepted silently; the meta reference passed check and crashed compile.
    with pytest.raises(error) as info:
        call(_net())
    assert says in str(info.value)


def test_check_reports_what_compile_refuses_for_a_meta_reference() -> None:
    m = _net()
    spec = regdsl.parse("layer 1.* l2 0.01 to ref")
    found = regdsl.check(spec, m, reference={"1.weight": torch.zeros(2, 8, device="meta"), "1.bias": torch.zeros(2)})
    assert [d.code for d in found] == ["RD105"]


@pytest.mark.parametrize(
    ("w0", "says"),
    [
        (torch.full((2, 8), float("nan")), "holds NaN or infinite values"),
        (torch.zeros(2, 8, dtype=torch.complex64), "torch.complex64 tensor, the parameter torch.float32"),
        (torch.zeros(2, 8, dtype=torch.long), "torch.int64 tensor"),
    ],
    ids=["nan", "complex", "int"],
)
def test_load_state_dict_checks_a_reference_as_compile_does(w0: torch.Tensor, says: str) -> None:
    # Before, a NaN w0 loaded and every penalty() was NaN from then on.
    m = _net()
    reg = regdsl.parse("layer 1.* l2 0.01 to init\nexclude bias").compile(m)
    state = reg.state_dict()
    before = reg.penalty().detach()
    with pytest.raises(regdsl.RegUsageError, match=says):
        reg.load_state_dict({**state, "references": {"1.weight": w0}})
    assert torch.equal(reg.penalty().detach(), before)


def test_load_state_dict_refuses_a_meta_reference_before_loading_any() -> None:
    # A model compiled on meta saves meta w0s. Before, the references ahead of it were replaced and the
    # meta one's copy then raised torch's NotImplementedError: a half-applied load.
    m = _net()
    reg = regdsl.parse("layer 0.* l2 0.01 to init\nlayer 1.* l2 0.01 to init").compile(m)
    state = reg.state_dict()
    refs = {name: torch.full_like(w0, 7.0) for name, w0 in state["references"].items()}
    refs["1.weight"] = torch.empty(2, 8, device="meta")
    before = {name: w0.clone() for name, w0 in state["references"].items()}
    with pytest.raises(regdsl.RegUsageError, match="reference for '1.weight' lies on the meta device"):
        reg.load_state_dict({**state, "step": 5, "references": refs})
    assert reg.step == 0
    for name, w0 in reg.state_dict()["references"].items():
        assert torch.equal(w0, before[name]), name


def test_strength_of_a_module_without_an_activity_term_says_which_name_it_lacks() -> None:
    # Before: "no parameter or module named 'fc2'", though fc2 is a module of the model.
    model = _net()
    reg = regdsl.parse("layer 1.* l2 0.01").compile(model)
    with pytest.raises(KeyError, match="no parameter named '1', nor a module with an activity term"):
        reg.strength("1", "l2")
    assert reg.strength("1.weight", "l2") == 0.01
