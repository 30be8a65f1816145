"""Search spaces in rule files (docs/language.md, "Search spaces"): what they parse to, their
names, the errors at their positions, with_values, Optuna's trials and search_space, grids, and
what check, explain and fmt do with them. The expected values are written out here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import regdsl
from regdsl import RegUsageError
from regdsl.spec import ChoiceSpace, LogUniformSpace, UniformSpace

RULES = """\
layer 0.** l2 loguniform(1e-5, 1e-2) as head_l2
layer 2.** l2 head_l2
all decay choice(0, 0.01, 0.1); all l1 uniform(0, 1e-3) prox
exclude bias
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def errors(text: str) -> list[tuple[int, int, str, str]]:
    with pytest.raises(regdsl.RegDslError) as info:
        regdsl.parse(text)
    return [(d.line, d.column, d.code, d.message) for d in info.value.diagnostics]


# ---------------------------------------------------------------- what a space parses to


def test_spaces_parse_to_nodes_with_names_and_positions() -> None:
    spec = regdsl.parse(RULES)
    spaces = spec.spaces()
    assert list(spaces) == ["head_l2", "decay:3", "l1:3"]
    head, decay, l1 = spaces.values()
    assert isinstance(head, LogUniformSpace) and (head.low, head.high, head.name) == (1e-5, 1e-2, "head_l2")
    assert isinstance(decay, ChoiceSpace) and decay.choices == (0.0, 0.01, 0.1) and decay.name is None
    assert isinstance(l1, UniformSpace) and (l1.low, l1.high) == (0.0, 1e-3)
    assert (head.pos.line, head.pos.column) == (1, 15)
    # The second rule's bare name holds the same space, marked as a use.
    use = spec.statements[1].terms[0].strength
    assert use.ref and use.name == "head_l2" and (use.low, use.high) == (1e-5, 1e-2)
    assert (use.pos.line, use.pos.column) == (2, 15)


def test_two_unnamed_spaces_of_one_kind_on_one_line_get_the_column() -> None:
    spec = regdsl.parse("layer a l2 uniform(0, 1); layer b l2 uniform(0, 2)\n")
    assert list(spec.spaces()) == ["l2:1:9", "l2:1:35"]  # the columns of the two terms


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("all decay uniform(0, 1)", "decay"),
        ("all l1 uniform(0, 1) prox", "l1"),
        ("all l2 uniform(0, 1) to init", "l2"),
        ("all group_lasso uniform(0, 1) dim=1", "group_lasso"),
        ("all orthogonal uniform(0, 1) warmup 3", "orthogonal"),
        ("all max_norm uniform(1, 3) dim=1", "max_norm"),
        ("all activity l1 uniform(0, 1)", "activity_l1"),
        ("all activity l2 uniform(0, 1)", "activity_l2"),
        ("all lr_mult uniform(0, 1)", "lr_mult"),
    ],
)
def test_every_kind_of_number_can_be_a_space(text: str, kind: str) -> None:
    spec = regdsl.parse(text)
    (name,) = spec.spaces()
    assert name == f"{kind}:1"
    assert spec.to_source() == regdsl.parse(spec.to_source()).to_source()


def test_canonical_text_and_json_keep_spaces_and_names() -> None:
    spec = regdsl.parse(RULES)
    assert spec.to_source() == (
        "layer 0.** l2 loguniform(1e-05, 0.01) as head_l2\n"
        "layer 2.** l2 head_l2\n"
        "all decay choice(0.0, 0.01, 0.1)\n"
        "all l1 uniform(0.0, 0.001) prox\n"
        "exclude bias\n"
    )
    assert regdsl.parse(spec.to_source()) == spec
    assert regdsl.Spec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("name", ["x #", "a b", "1a", "", "x;y", "nan"])
def test_json_refuses_a_space_name_the_language_could_not_write(name: str) -> None:
    # 'x #' would print as 'as x #', which reads back as the name 'x' and a comment.
    data = regdsl.parse("all l2 uniform(0, 1) as lam\nall l1 lam").to_json().replace('"lam"', json.dumps(name))
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.Spec.from_json(data)
    assert all(d.code == "RD010" for d in info.value.diagnostics), info.value.diagnostics


@pytest.mark.parametrize(
    "strength",
    [
        '{"kind": "name", "name": ["x"]}',  # a name that is no string
        '{"kind": "uniform", "low": 0, "high": 1, "name": "a", "pos": "p"}',  # a position that is no object
    ],
)
def test_json_with_odd_names_or_positions_is_a_validation_error(strength: str) -> None:
    term = '{"kind": "l1", "strength": {"kind": "uniform", "low": 0, "high": 1, "name": "a"}}'
    data = f'{{"statements": [{{"kind": "rule", "selector": {{"atoms": [{{"kind": "all"}}]}}, "terms": [{{"kind": "l2", "strength": {strength}}}, {term}]}}]}}'
    with pytest.raises(regdsl.RegValidationError):
        regdsl.Spec.from_json(data)


def test_fmt_keeps_spaces_and_comments() -> None:
    text = "all l2   loguniform( 1e-5 ,1e-2 )as lam  # tuned\nlayer x l1 lam\n"
    assert regdsl.format_source(text) == "all l2 loguniform(1e-05, 0.01) as lam  # tuned\nlayer x l1 lam\n"


def test_a_name_may_be_used_before_the_line_that_defines_it() -> None:
    spec = regdsl.parse("layer a l1 lam\nlayer b l2 loguniform(1e-4, 1e-1) as lam\n")
    assert list(spec.spaces()) == ["lam"]
    assert spec.statements[0].terms[0].strength.ref


# ---------------------------------------------------------------- errors, with positions


@pytest.mark.parametrize(
    ("text", "where", "code", "words"),
    [
        ("all l2 loguniform(0, 1)", (1, 19), "RD010", "needs a > 0"),
        ("all l2 loguniform(-5, -2)", (1, 19), "RD010", "not exponents"),
        ("all l2 uniform(2, 1)", (1, 19), "RD010", "needs a < b"),
        ("all l2 uniform(1, 1)", (1, 19), "RD010", "needs a < b"),
        ("all l2 uniform(1, inf)", (1, 19), "RD010", "finite"),
        ("all l2 uniform(-1, 1)", (1, 16), "RD004", "strength must be >= 0"),
        ("all max_norm uniform(0, 3)", (1, 22), "RD004", "max_norm must be a finite number > 0"),
        ("all l1 choice(0, 1e-4, 1e-4)", (1, 24), "RD010", "lists 0.0001 twice"),
        ("all l1 choice(1, -2)", (1, 18), "RD004", "strength must be >= 0"),
        ("layer head.** l2 lam", (1, 18), "RD010", "no search space is named 'lam'"),
        ("all l2 uniform(0, 1) as lam\nall l1 choice(1, 2) as lam", (2, 8), "RD010", "already defined on line 1"),
        ("all l2 uniform(0, 1) as decay", (1, 25), "RD010", "'decay' is a keyword"),  # at the name
        ("all decay none", (1, 11), "RD010", "'none' is a keyword"),
        # Where a strength stands these read as numbers: a space so named could never be referenced.
        ("all l2 uniform(0, 1) as nan", (1, 25), "RD010", "cannot be named 'nan'"),
        ("all l2 uniform(0, 1) as Infinity", (1, 25), "RD010", "cannot be named 'Infinity'"),
        ("all l2 uniform(0, 1) as INF", (1, 25), "RD010", "cannot be named 'INF'"),
        # A space a term reuses must hold only values that term accepts.
        ("all l2 uniform(0, 1) as lam\nlayer x max_norm lam", (2, 18), "RD004", "max_norm must be a finite number > 0"),
        # ... a choice too: the error stands at the use, not at the definition, where 0 is fine.
        ("layer a l2 choice(0, 1) as lam\nlayer b max_norm lam", (2, 18), "RD004", "max_norm must be a finite number > 0"),
    ],
)
def test_invalid_spaces_are_positioned_errors(text: str, where: tuple[int, int], code: str, words: str) -> None:
    found = errors(text)
    assert any((line, col) == where and c == code and words in message for line, col, c, message in found), found


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("all l2 loguniform(1e-3 1)", "expected ','"),
        ("all l2 choice()", "expected a number"),
        ("all l2 uniform(0, 1) as", "expected a search space's name"),
        ("all l2", "expected a number, a search space (loguniform, uniform, choice) or a search space's name"),
    ],
)
def test_malformed_spaces_are_syntax_errors(text: str, words: str) -> None:
    ((_, _, code, message),) = errors(text)
    assert code == "RD001" and words in message


@pytest.mark.parametrize("literal", ["1e400", "1e-400"])
def test_a_bad_literal_in_a_choice_is_one_error_not_also_a_repeated_zero(literal: str) -> None:
    # The bad literal stands in as 0 to keep going; that 0 beside a written one is no second error.
    assert [(col, code) for _, col, code, _ in errors(f"all l1 choice({literal}, 0)")] == [(15, "RD003")]
    assert [code for *_, code, _ in errors(f"all l1 choice({literal}, 1, 1)")] == ["RD003", "RD010"]


def test_a_name_whose_definition_was_lost_to_a_syntax_error_is_not_called_undefined() -> None:
    assert [(line, code) for line, _, code, _ in errors("all l2 uniform(0, 1) as lam l3\nall l1 lam\n")] == [(1, "RD001")]
    # A syntax error elsewhere, on a line without the name, hides nothing.
    assert [(line, code) for line, _, code, _ in errors("all l3 1\nall l1 lam\n")] == [(1, "RD001"), (2, "RD010")]


def test_every_bad_space_of_a_file_is_reported_at_once() -> None:
    found = errors("all l2 loguniform(0, 1)\nall l1 uniform(3, 2)\nlayer x l2 nope\n")
    assert [(line, code) for line, _, code, _ in found] == [(1, "RD010"), (2, "RD010"), (3, "RD010")]


# ---------------------------------------------------------------- values


def test_with_values_gives_the_concrete_file() -> None:
    spec = regdsl.parse(RULES)
    concrete = spec.with_values({"head_l2": 1e-3, "decay:3": 0.01, "l1:3": 5e-4})
    expected = regdsl.parse("layer 0.** l2 1e-3\nlayer 2.** l2 1e-3\nall decay 0.01; all l1 5e-4 prox\nexclude bias\n")
    assert concrete == expected
    assert concrete.spaces() == {}
    assert concrete.to_source() == expected.to_source()


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"head_l2": 1e-3, "decay:3": 0.01}, "no value for 'l1:3'"),
        ({"head_l2": 1e-3, "decay:3": 0.01, "l1:3": 0.0, "lam": 1.0}, "'lam' names no search space"),
        ({"head_l2": 1.0, "decay:3": 0.01, "l1:3": 0.0}, "1.0 for 'head_l2' is outside loguniform(1e-05, 0.01)"),
        ({"head_l2": 1e-3, "decay:3": 0.02, "l1:3": 0.0}, "0.02 for 'decay:3' is outside choice(0.0, 0.01, 0.1)"),
        ({"head_l2": 1e-3, "decay:3": 0.01, "l1:3": "0"}, "'l1:3' takes a number (int or float), not str"),
        ({"head_l2": 1e-3, "decay:3": 0.01, "l1:3": torch.tensor(5e-4)}, "'l1:3' takes a number (int or float), not Tensor"),
        ({"head_l2": 1e-3, "decay:3": 0.01, "l1:3": True}, "not bool"),
    ],
)
def test_with_values_refuses_missing_unknown_and_outside_values(values: dict, words: str) -> None:
    with pytest.raises(RegUsageError, match="with_values") as info:
        regdsl.parse(RULES).with_values(values)
    assert words in str(info.value)


def test_with_values_takes_numpy_scalars() -> None:
    np = pytest.importorskip("numpy")
    concrete = regdsl.parse(RULES).with_values({"head_l2": np.float32(1e-3), "decay:3": np.float64(0.01), "l1:3": np.int64(0)})
    values = [s.terms[0].value for s in concrete.statements[:4]]
    assert values == [float(np.float32(1e-3)), float(np.float32(1e-3)), 0.01, 0.0]
    assert concrete.spaces() == {}


def test_compile_refuses_what_is_no_trial() -> None:
    with pytest.raises(TypeError, match="trial= takes an Optuna trial .* not dict"):
        regdsl.compile(regdsl.parse(RULES), mlp(), trial={"head_l2": 1e-3})


def test_compile_refuses_spaces_naming_each_one() -> None:
    spec = regdsl.parse(RULES, "tune.reg")
    with pytest.raises(regdsl.RegCompileError) as info:  # an error diagnostic at compile, as RD101 is
        regdsl.compile(spec, mlp())
    found = [(d.file, d.line, d.column, d.code) for d in info.value.diagnostics]
    assert found == [("tune.reg", 1, 15, "RD011"), ("tune.reg", 3, 11, "RD011"), ("tune.reg", 3, 40, "RD011")]
    text = str(info.value)
    for name in ("'head_l2'", "'decay:3'", "'l1:3'"):
        assert name in text
    assert "with_values" in text and "trial=" in text


class RecordingTrial:
    """Optuna's trial interface, recording each call and answering from ``answers``."""

    def __init__(self, answers: dict[str, float]):
        self.answers, self.calls = answers, []

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.calls.append(("float", name, low, high, log))
        return self.answers[name]

    def suggest_categorical(self, name: str, choices: list) -> float:
        self.calls.append(("categorical", name, tuple(choices)))
        return self.answers[name]


def test_compile_with_a_trial_suggests_each_space_once_and_shares_named_values() -> None:
    trial = RecordingTrial({"head_l2": 2e-3, "decay:3": 0.1, "l1:3": 1e-4})
    model = mlp()
    reg = regdsl.compile(regdsl.parse(RULES), model, trial=trial)
    assert trial.calls == [
        ("float", "head_l2", 1e-5, 1e-2, True),
        ("categorical", "decay:3", (0.0, 0.01, 0.1)),
        ("float", "l1:3", 0.0, 1e-3, False),
    ]
    assert reg.strength("0.weight", "l2") == 2e-3 and reg.strength("2.weight", "l2") == 2e-3
    assert reg.strength("0.weight", "l1") == 1e-4
    decays = {g["name"]: g["weight_decay"] for g in reg.param_groups(lr=0.1)}
    assert sorted(decays.values()) == [0.0, 0.1]
    # The penalty is the concrete file's: λ/2·Σw² on both weights (l1 is prox: in the step).
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    expected = 2e-3 / 2 * (w0.square().sum() + w2.square().sum())
    torch.testing.assert_close(reg.penalty().detach(), expected)


def test_search_space_gives_optuna_distributions() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    space = regdsl.parse(RULES).search_space()
    assert space == {
        "head_l2": FloatDistribution(1e-5, 1e-2, log=True),
        "decay:3": CategoricalDistribution((0.0, 0.01, 0.1)),
        "l1:3": FloatDistribution(0.0, 1e-3),
    }


def test_an_optuna_study_tunes_the_file_and_the_best_file_is_the_checked_one() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = regdsl.parse("all l2 loguniform(1e-4, 1.0) as lam\nexclude bias\n")
    target = torch.tensor([[3.0, -2.0, 1.0]])

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(0)
        model = nn.Linear(3, 1, bias=False)
        reg = regdsl.compile(spec, model, trial=trial)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1))
        reg.attach(opt, fold=True)
        for _ in range(50):  # fit w to target with l2: the ridge solution shrinks as lam grows
            opt.zero_grad()
            (model.weight - target).square().sum().div(2).backward()
            opt.step()
        return float((model.weight.detach() - target).square().sum())

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(objective, n_trials=8)
    best = spec.with_values(study.best_params)
    lam = study.best_params["lam"]
    assert best.to_source() == f"all l2 {lam!r}\nexclude bias\n"
    assert lam == min(t.params["lam"] for t in study.trials)  # the least shrinkage fits best


# ---------------------------------------------------------------- grids


def test_grid_enumerates_every_combination() -> None:
    spec = regdsl.parse("all l2 loguniform(1e-4, 1e-2) as a\nall l1 choice(0, 1)\nall decay uniform(0, 1)\n")
    points = list(regdsl.grid(spec, n=3))
    assert len(points) == 3 * 2 * 3
    assert points[0] == {"a": 1e-4, "l1:2": 0.0, "decay:3": 0.0}
    assert points[-1] == {"a": 1e-2, "l1:2": 1.0, "decay:3": 1.0}
    assert sorted({p["a"] for p in points}) == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert sorted({p["decay:3"] for p in points}) == [0.0, 0.5, 1.0]
    for values in points:  # each one compiles as it is
        spec.with_values(values)


def test_grid_of_one_point_is_the_stand_in_and_n_must_be_whole() -> None:
    spec = regdsl.parse("all l2 loguniform(1e-4, 1e-2)\n")
    assert list(regdsl.grid(spec, n=1)) == [{"l2:1": pytest.approx(1e-3)}]
    assert list(regdsl.grid(regdsl.parse("all l2 1e-4"), n=4)) == [{}]
    for bad in (0, 2.5, True):
        with pytest.raises(RegUsageError, match="n must be"):
            list(regdsl.grid(spec, n=bad))


def test_grid_gives_each_point_once_when_an_interval_holds_fewer_than_n_floats() -> None:
    # 0, then the two subnormals 5e-324 and 1e-323: the only floats of the interval.
    spec = regdsl.parse("all l2 uniform(0, 1e-323)\nall l1 loguniform(5e-324, 1e-323)\n")
    points = list(regdsl.grid(spec, n=5))
    assert sorted({p["l2:1"] for p in points}) == [0.0, 5e-324, 1e-323]
    assert sorted({p["l1:2"] for p in points}) == [5e-324, 1e-323]
    assert len(points) == 3 * 2  # no combination twice
    assert len({tuple(p.values()) for p in points}) == len(points)


# ---------------------------------------------------------------- check, explain


def test_check_and_explain_accept_spaces_and_show_them() -> None:
    spec = regdsl.parse(RULES)
    model = mlp()
    assert [d.code for d in regdsl.check(spec, model)] == ["RD204", "RD204"]  # decay beside l2, as with numbers
    rows = {r.name: r for r in regdsl.resolve(spec, model).rows}
    table = regdsl.format_explain(list(rows.values()))
    assert "loguniform(1e-05, 0.01) as head_l2" in table and "choice(0.0, 0.01, 0.1)" in table
    assert "uniform(0.0, 0.001) prox" in table
    # The stand-in that resolves a space is inside it and never 0 where the space allows more.
    assert rows["0.weight"].terms["l2"].value == pytest.approx(math.sqrt(1e-5 * 1e-2))
    assert rows["0.weight"].terms["decay"].value == 0.01
    assert rows["0.weight"].terms["l1"].value == 5e-4
    groups = regdsl.resolve(spec, model).groups_summary()
    # The group is named by the space too ("decay:3", the decay's space on line 3): see the next test.
    assert [(g.name, g.space) for g in groups] == [("decay=choice(0.0, 0.01, 0.1) (decay:3)", "choice(0.0, 0.01, 0.1)"), ("no_decay", "")]
    table = regdsl.format_groups(groups).splitlines()
    assert table[2].split()[:3] == ["decay=choice(0.0,", "0.01,", "0.1)"] and "choice(0.0, 0.01, 0.1)  " in table[2]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        # Three decay spaces whose stand-ins are all 1.0: three settings once valued, so three groups.
        (
            "all decay loguniform(1e-2, 1e2)\nexclude bias\nlayer 2.** decay uniform(0, 2)\nlayer 0.weight decay loguniform(1e-2, 1e2)",
            [
                ("decay=loguniform(0.01, 100.0) (decay:4)", ["0.weight"]),
                ("no_decay", ["0.bias", "2.bias"]),
                ("decay=uniform(0.0, 2.0) (decay:3)", ["2.weight"]),
            ],
        ),
        # A literal decay equal to a space's stand-in, and an lr_mult space whose stand-in is 1.
        (
            "all decay choice(0, 0.1)\nlayer 0.weight lr_mult loguniform(0.1, 10) as lm\nlayer 2.bias decay 0.1",
            [
                ("decay=choice(0.0, 0.1) (decay:1, lm)", ["0.weight"]),
                ("decay=choice(0.0, 0.1) (decay:1)", ["0.bias", "2.weight"]),
                ("decay=0.1", ["2.bias"]),
            ],
        ),
        # A named space used twice is one setting: one group.
        ("layer 0.** decay uniform(0, 1) as wd\nlayer 2.** decay wd", [("decay=uniform(0.0, 1.0) (wd)", ["0.weight", "0.bias", "2.weight", "2.bias"])]),
    ],
)
def test_explain_keeps_settings_of_separate_spaces_in_separate_groups(rules: str, expected: list) -> None:
    # Before, groups were keyed on stand-in values alone: the first file showed one group of 3 tensors
    # where any valued file gives 2 or 3, and a literal 0.1 joined the choice(0, 0.1) group.
    groups = regdsl.resolve(regdsl.parse(rules), mlp()).groups_summary()
    assert [(g.name, list(g.params)) for g in groups] == expected


@pytest.mark.parametrize(
    ("text", "renamed"),
    [
        ("# tuned\n\n\nall l1 choice(0, 1e-5) prox\n", [("l1:4", "l1:3", 4)]),  # the blank lines shrink to one
        ("all l1 choice(0, 1e-5); layer 2.** l1 uniform(0, 1)\n", [("l1:1:5", "l1:1", 1), ("l1:1:36", "l1:2", 1)]),
        ("all depth 0; lr_decay choice(0.5, 0.9)\n", [("lr_decay:1", "lr_decay:2", 1)]),
    ],
)
def test_formatting_that_would_rename_an_unnamed_space_is_refused(text: str, renamed: list) -> None:
    # Before, fmt renamed them: a stored study's best_params, or with_values({'l1:4': ...}), no longer fit.
    with pytest.raises(regdsl.RegValidationError) as caught:
        regdsl.format_source(text, "t.reg")
    got = [(d.code, d.line, d.message.split("'")[1:4:2]) for d in caught.value.diagnostics]
    assert got == [("RD014", line, [old, new]) for old, new, line in renamed]
    names = list(regdsl.parse(text).spaces())
    assert [old for old, _, _ in renamed] == [n for n in names if ":" in n]
    named = text.replace("1e-5)", "1e-5) as a").replace("1)", "1) as b").replace("0.9)", "0.9) as c")
    assert set(regdsl.parse(regdsl.format_source(named)).spaces()) == set(regdsl.parse(named).spaces())


def test_cli_check_explain_and_fmt_on_a_file_with_spaces(tmp_path: Path) -> None:
    rules = tmp_path / "tune.reg"
    rules.write_text(RULES)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "regdsl", *args], capture_output=True, text=True, check=False)

    done = run("check", str(rules))
    assert done.returncode == 0 and "All checks passed: 1 file, 5 statements." in done.stdout, done.stdout + done.stderr
    # Split from its line, the unnamed l1 space would be 'l1:4', no longer 'l1:3': refused, the file kept.
    done = run("fmt", str(rules))
    assert done.returncode == 1 and "tune.reg:3:40: error: RD014" in done.stdout and "from 'l1:3' to 'l1:4'" in done.stdout
    assert rules.read_text() == RULES
    named = tmp_path / "named.reg"
    named.write_text(RULES.replace("uniform(0, 1e-3)", "uniform(0, 1e-3) as l1_strength"))
    done = run("fmt", "--check", str(named))
    assert done.returncode == 1 and "Would reformat" in done.stdout  # the canonical text spells the numbers out
    done = run("fmt", "--diff", str(named))
    assert "+layer 0.** l2 loguniform(1e-05, 0.01) as head_l2" in done.stdout, done.stdout + done.stderr
    model = tmp_path / "model.py"
    model.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    done = run("check", str(rules), "--model", f"{model}:build")
    assert done.returncode == 0 and "RD204" in done.stdout, done.stdout + done.stderr
    done = run("explain", str(rules), "--model", f"{model}:build")
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("2.weight")]
    assert "choice(0.0, 0.01, 0.1)" in row and "head_l2" in row and "uniform(0.0, 0.001) prox" in row
    bad = tmp_path / "bad.reg"
    bad.write_text("all l2 loguniform(0, 1e-2)\n")
    done = run("check", str(bad))
    assert done.returncode == 1
    assert f"{bad}:1:19: error: RD010 loguniform(a, b) needs a > 0" in done.stdout
    assert "all l2 loguniform(0, 1e-2)\n" + " " * 18 + "^" in done.stdout


# ---------------------------------------------------------------- the example


@pytest.mark.parametrize("how", [("--trials", "6"), ("--grid", "2")])
def test_the_tuning_example_prints_the_checked_file_with_the_winning_numbers(how: tuple[str, str]) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "tune.py"), *how], capture_output=True, text=True, check=False, cwd=root,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr
    head = done.stdout.splitlines()[0]
    assert head == "examples/tune.reg: wd ~ loguniform(0.01, 100.0), l1:6 ~ choice(0.0, 0.0001, 0.001)"
    assert ("6 trials, " if how[0] == "--trials" else "grid of 6 points") in done.stdout
    won = regdsl.parse(done.stdout.split("the file that won:\n", 1)[1])
    tuned = regdsl.load(root / "examples" / "tune.reg")
    (wd,) = {t.strength for s in won.statements if s.kind == "rule" for t in s.terms if t.kind == "decay"}
    (l1,) = [t.strength for s in won.statements if s.kind == "rule" for t in s.terms if t.kind == "l1"]
    assert won == tuned.with_values({"wd": wd, "l1:6": l1})  # the checked file, numbers in place of spaces
    assert won.spaces() == {}


def test_lr_decay_can_be_tuned_and_its_space_named() -> None:
    spec = regdsl.parse("lr_decay uniform(0.5, 1) as d\nlayer 0 depth 0\nlayer 2 depth last lr_mult d\n")
    assert list(spec.spaces()) == ["d"]
    assert spec.to_source() == "lr_decay uniform(0.5, 1.0) as d\nlayer 0 depth 0\nlayer 2 depth last lr_mult d\n"
    trial = RecordingTrial({"d": 0.8})
    model = mlp()
    reg = regdsl.compile(spec, model, trial=trial)
    assert trial.calls == [("float", "d", 0.5, 1.0, False)]
    lr = {id(p): g["lr"] for g in reg.param_groups(lr=1.0) for p in g["params"]}
    # depth 0 of 1 deepest: 0.8 ** 1; the last depth: lr_mult 0.8 times 0.8 ** 0.
    assert lr[id(model[0].weight)] == pytest.approx(0.8) and lr[id(model[2].weight)] == pytest.approx(0.8)
    assert errors("lr_decay loguniform(1e-3, 2)\nall depth 0")[0][2:] == (
        "RD013", "lr_decay must be a number in (0, 1], got 2.0 (a value of loguniform(0.001, 2.0))"
    )



def test_a_diagnostic_about_a_valued_spec_shows_the_line_as_written() -> None:
    # Before, a trial's (or with_values') spec had no source text: 'f.reg:2:7: error: ...' and nothing under it.
    spec = regdsl.parse("all decay 0.01\nlayer haed l2 uniform(0, 1) as lam\n", "f.reg").with_values({"lam": 0.5})
    with pytest.raises(regdsl.RegCompileError) as info:
        spec.compile(mlp())
    assert str(info.value).splitlines()[1:3] == ["layer haed l2 uniform(0, 1) as lam", "      ^^^^"]


def test_grid_of_a_path_is_a_type_error_at_the_call() -> None:
    # Before: AttributeError: 'str' object has no attribute 'statements', at the first next().
    with pytest.raises(TypeError, match="grid\\(\\) takes a Spec .* not a str"):
        regdsl.grid("tune.reg", n=2)
    with pytest.raises(RegUsageError, match="n must be"):
        regdsl.grid(regdsl.parse(RULES), n=0)


@pytest.mark.parametrize(("choices", "factor"), [("1, 0.5", 0.5), ("0.5, 1", 0.5), ("1, 0.9, 0.5", 0.9), ("1", 1.0)])
def test_an_lr_decay_choice_stands_in_with_a_decay_that_is_on(choices: str, factor: float) -> None:
    # lr_decay 1 is no decay: the first choice stood in, so 'choice(1, 0.5)' explained as every lr_factor 1.0.
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    rules = f"lr_decay choice({choices})\nlayer 0 depth 0\nlayer 1 depth 1\n"
    rows = regdsl.resolve(regdsl.parse(rules), model).rows
    assert [(r.name, r.lr_factor) for r in rows] == [("0.weight", factor), ("0.bias", factor), ("1.weight", 1.0), ("1.bias", 1.0)]


def test_a_named_space_shared_by_lr_decay_and_a_strength_stands_in_with_one_value() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    rules = "all l2 choice(1, 0.5) as d\nlr_decay d\nlayer 0 depth 0\nlayer 1 depth 1\n"
    rows = regdsl.resolve(regdsl.parse(rules), model).rows
    assert {r.terms["l2"].value for r in rows} == {0.5}  # before: l2 stood in with 1.0, lr_decay with 0.5
    assert [r.lr_factor for r in rows] == [0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("space", "value"),
    [("loguniform(1e-8, 1e4)", 0.0), ("loguniform(1e-6, 1e6)", 5e-7), ("uniform(1, 1e13)", 0.5), ("uniform(0, 1e13)", -5.0)],
)
def test_a_value_outside_a_wide_space_is_refused_not_moved_to_its_bound(space: str, value: float) -> None:
    # Before, the slack for rounding scaled with the larger bound and applied to both: 0 for
    # loguniform(1e-8, 1e4) became 1e-08, -5 for uniform(0, 1e13) a strength of 0, without a word.
    with pytest.raises(RegUsageError, match=rf"{value} for 'lam' is outside"):
        regdsl.parse(f"all decay {space} as lam\n").with_values({"lam": value})


def test_a_draw_a_rounding_step_outside_its_bound_is_the_bound() -> None:
    # What the slack is for: Optuna's log-uniform draw can land a rounding step past exp(log(b)).
    low, high = 1e-5, 1e-2
    concrete = regdsl.parse(f"all decay loguniform({low}, {high}) as lam\n").with_values({"lam": high * (1 + 1e-15)})
    assert concrete.statements[0].terms[0].value == high


def test_a_name_defined_three_times_is_reported_at_each_repeat() -> None:
    # Before, both errors were on line 3 (the second at line 3's name: an id reused by a new dict pointed
    # there), and the repeat on line 5 was never shown.
    text = "all l2 uniform(0, 1) as x\nexclude bias\nall l1 uniform(0, 1) as x\nexclude norm\nall decay choice(0, 0.5) as x\n"
    with pytest.raises(regdsl.RegDslError) as info:
        regdsl.parse(text)
    assert [(d.line, d.column, d.code) for d in info.value.diagnostics] == [(3, 8, "RD010"), (5, 11, "RD010")]
    assert all("already defined on line 1" in d.message for d in info.value.diagnostics)


def test_lr_decay_defining_a_name_first_is_the_definition_a_later_line_repeats() -> None:
    # Before: reported on line 2, "already defined on line 3" (lr_decay's slot was read after every term's).
    with pytest.raises(regdsl.RegDslError) as info:
        regdsl.parse("all depth 0\nlr_decay uniform(0.5, 1) as d\nall l2 uniform(0.5, 1) as d\n")
    (d,) = info.value.diagnostics
    assert (d.line, d.column) == (3, 8) and "already defined on line 2" in d.message
