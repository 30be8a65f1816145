"""compile() is as strict as check (issue 8, points 2 and 5).

Every error ``regdsl.check`` finds makes ``compile`` raise the same positioned
diagnostics before anything is built; every warning is a ``RegDslWarning``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CNN, MLP, TinyTransformer
from torch import nn

import regdsl


def snapshot(model: nn.Module) -> list[tuple]:
    return [
        (name, id(p), p.requires_grad, p.detach().clone())
        for name, p in model.named_parameters(remove_duplicate=False)
    ] + [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


def same(a: list[tuple], b: list[tuple]) -> bool:
    def eq(x: object, y: object) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return len(a) == len(b) and all(all(map(eq, x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "text, code, column",
    [
        ("layer haed.** l1 1e-4\n", "RD101", 7),
        ("type Linaer l2 1\n", "RD102", 6),
        ("all decay 0.1\nlayer fc1.weight, fc9 l1 1e-4\n", "RD101", 19),
        ("layer fc1.weight bias l2 1\n", "RD101", 1),
    ],
    ids=["layer_typo", "type_typo", "one_pattern_of_two", "never_all_at_once"],
)
def test_a_rule_that_matches_nothing_is_a_compile_error(text: str, code: str, column: int, tmp_path: Path) -> None:
    path = tmp_path / "rules.reg"
    path.write_text(text, encoding="utf-8")
    model = MLP()
    before = snapshot(model)
    with pytest.raises(regdsl.RegCompileError) as caught:
        regdsl.compile(path, model)
    (d,) = caught.value.diagnostics
    assert (d.code, d.severity, d.file, d.column) == (code, "error", str(path), column)
    assert d.source_line == text.split("\n")[d.line - 1]
    rendered = str(caught.value)
    assert rendered.startswith(f"{path}:{d.line}:{column}: error: {code} ")
    assert rendered.splitlines()[2].index("^") == column - 1
    # The same diagnostic, as check() reports it.
    assert [x for x in regdsl.check(regdsl.load(path), model) if x.severity == "error"] == [d]
    assert same(snapshot(model), before)  # nothing half-applied


def test_the_readme_loop_sees_the_typo() -> None:
    # The four lines most users run: compile, param_groups, penalty. The typo never gets that far.
    model = MLP()
    with pytest.raises(regdsl.RegCompileError, match=r"<string>:2:7: error: RD101 layer pattern 'haed\.\*\*'"):
        reg = regdsl.parse("all decay 0.05\nlayer haed.** l1 1e-4\n").compile(model)
        torch.optim.AdamW(reg.param_groups(lr=1e-3))


def test_warnings_are_regdsl_warnings_with_a_position_at_the_callers_line() -> None:
    spec = regdsl.parse("all decay 0.05 l2 1e-4\nexclude embedding\n", "shared.reg")
    with pytest.warns(regdsl.RegDslWarning) as caught:
        reg = spec.compile(MLP())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith("shared.reg:1:16: warning: RD204 ")
    assert messages[1].startswith("shared.reg:2:9: warning: RD201 ")
    assert "\nexclude embedding\n        ^" in messages[1]
    # The warning points at this test's line, not at regdsl's internals.
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}
    assert issubclass(regdsl.RegDslWarning, UserWarning)
    assert reg.param_groups()  # a warning is no error: the file compiled


def test_strict_run_turns_warnings_into_errors() -> None:
    spec = regdsl.parse("all decay 0.05\nexclude embedding\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", regdsl.RegDslWarning)
        with pytest.raises(regdsl.RegDslWarning, match="RD201"):
            spec.compile(MLP())


def test_a_shared_file_keeps_working_on_a_model_without_what_it_excludes() -> None:
    # One file for a CNN with BatchNorm and a transformer with embeddings: each model lacks something.
    text = "all decay 0.05\nexclude bias\nexclude norm\nexclude embedding\n"
    spec = regdsl.parse(text)
    for model in (MLP(), CNN(), TinyTransformer()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reg = spec.compile(model)
        codes = {str(w.message).split(": ")[2].split()[0] for w in caught if w.category is regdsl.RegDslWarning}
        assert codes <= {"RD201"}
        assert sum(len(g["params"]) for g in reg.param_groups()) == len({id(p) for p in model.parameters()})


def test_a_dead_rule_is_a_warning_not_an_error() -> None:
    # Defaults, then overrides: on a model made only of Linear layers the default is dead, and that is fine.
    spec = regdsl.parse("all l2 1e-4\ntype Linear l2 1e-3\n")
    with pytest.warns(regdsl.RegDslWarning, match="RD103"):
        reg = spec.compile(MLP())
    assert reg.strength("fc1.weight", "l2") == 1e-3


@pytest.mark.parametrize(
    "model, why",
    [
        (nn.Sequential(nn.ReLU(), nn.Dropout()), "the model has no parameters"),
        (MLP().requires_grad_(False), "all 6 of its parameter tensors are frozen (requires_grad=False)"),
    ],
    ids=["no_parameters", "all_frozen"],
)
def test_nothing_to_train_is_an_error(model: nn.Module, why: str) -> None:
    with pytest.raises(regdsl.RegCompileError) as caught:
        regdsl.parse("\nall decay 0.05\n").compile(model)
    (d,) = caught.value.diagnostics
    assert (d.code, d.line, d.column) == ("RD107", 2, 1)
    assert d.message == f"nothing to train: {why}"


def test_nothing_to_train_even_with_an_empty_file() -> None:
    with pytest.raises(regdsl.RegCompileError, match="RD107 nothing to train: the model has no parameters"):
        regdsl.parse("").compile(nn.Identity())


# ---------------------------------------------------------------- one code path, as a property

_MODELS = {"mlp": MLP, "cnn": CNN, "transformer": TinyTransformer}
_ATOMS = st.sampled_from(
    ["all", "bias", "norm", "embedding", "type Linear", "type Conv2d", "type Lienar", "layer fc1", "layer head.*",
     "layer blocks.*.attn.**", "layer conv*", "layer nope.**"]
)
_TERMS = st.sampled_from(["decay 0.05", "l2 1e-4", "l1 1e-5", "decay 0", "none", "group_lasso 1e-4", "orthogonal 1e-3"])
_STATEMENT = st.one_of(
    st.builds(lambda a, t: f"{a} {t}", _ATOMS, _TERMS),
    st.builds(lambda a, b, t: f"{a} {b} {t}", _ATOMS, _ATOMS, _TERMS),
    st.builds(lambda a: f"exclude {a}", _ATOMS),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(statements=st.lists(_STATEMENT, min_size=0, max_size=5), model_name=st.sampled_from(sorted(_MODELS)))
def test_compile_raises_exactly_what_check_reports(statements: list[str], model_name: str) -> None:
    torch.manual_seed(0)
    model = _MODELS[model_name]()
    spec = regdsl.parse("\n".join(statements) + "\n", "prop.reg")
    found = regdsl.check(spec, model)
    errors = [d for d in found if d.severity == "error"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if errors:
            with pytest.raises(regdsl.RegCompileError) as info:
                spec.compile(model)
            assert info.value.diagnostics == errors
            assert not caught  # no warning for a file that is refused
            return
        spec.compile(model)
    assert [str(w.message) for w in caught if w.category is regdsl.RegDslWarning] == [d.render() for d in found]
