"""The terms of issue 4 through the reporting side: `explain` (table, JSON, CSV, `--group`) and `check`.

The model is ``check_models.ActivityCNN`` (its docstring lists every parameter and
module). Every expected cell, group, line and column below is derived by hand from
the rule text (which rule sets which term on which tensor or module), never read
back from regdsl. CLI runs go through ``regdsl.cli.main`` in this process (the
function the entry point calls), as tests/test_cli_model.py does for the formats.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from check_models import act_cnn
from support import aligned_cells

import regdsl
from regdsl.report import explain_csv, explain_records, format_explain, format_groups, group_records, groups_csv
from regdsl.resolution import resolve

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MODEL = f"{TESTS / 'check_models.py'}:act_cnn"

# ActivityCNN's parameters: conv1.weight 4x3x3x3 (108), conv1.bias 4, bn1.weight 4, bn1.bias 4,
# conv2.weight 8x4x3x3 (288), head.weight 5x8 (40), head.bias 5: 7 tensors, 453 elements.
# Modules: conv1, bn1, act1 (ReLU), conv2, act2 (ReLU), pool (AdaptiveAvgPool2d), head.
RULES = """\
# every term of issue 4 on ActivityCNN
all decay 0.05 warmup 100
exclude bias
norm decay 0
layer conv1.weight l1 1e-4 prox warmup 100 orthogonal 1e-3
layer conv2.weight l2 0.01 to init group_lasso 0.1 dim=1
layer head.weight max_norm 2 dim=1 l2 0.5 to ref cosine to 0.1 over 1000
layer head.** lr_mult 0.1
type ReLU activity l1 1e-3 from 10 until 500
layer pool activity l2 0.5
layer act2 activity l2 2e-3 warmup 20
"""

# RULES in canonical form, written by hand: numbers as repr(float), options and schedules as written.
CANONICAL = """\
all decay 0.05 warmup 100
exclude bias
norm decay 0.0
layer conv1.weight l1 0.0001 prox warmup 100 orthogonal 0.001
layer conv2.weight l2 0.01 to init group_lasso 0.1 dim=1
layer head.weight max_norm 2.0 dim=1 l2 0.5 to ref cosine to 0.1 over 1000
layer head.** lr_mult 0.1
type ReLU activity l1 0.001 from 10 until 500
layer pool activity l2 0.5
layer act2 activity l2 0.002 warmup 20
"""

KINDS = ["decay", "l1", "l2", "group_lasso", "orthogonal", "max_norm", "lr_mult"]
PARAM_HEADER = ["parameter", "shape", "numel", *KINDS, "set by (line)"]
DECAY = "0.05 warmup 100"  # line 2, on every tensor no exclude removes
# (parameter, shape, numel, decay, l1, l2, group_lasso, orthogonal, max_norm, lr_mult, set by)
PARAM_ROWS = [
    ("conv1.weight", "4x3x3x3", "108", DECAY, "0.0001 prox warmup 100", "-", "-", "0.001", "-", "-",
     "decay:2 l1:5 orthogonal:5"),
    ("conv1.bias", "4", "4", "-", "-", "-", "-", "-", "-", "-", "excluded:3"),
    ("bn1.weight", "4", "4", "0.0", "-", "-", "-", "-", "-", "-", "decay:4"),  # norm decay 0 overrides line 2
    ("bn1.bias", "4", "4", "-", "-", "-", "-", "-", "-", "-", "excluded:3"),  # the exclude beats 'norm decay 0'
    ("conv2.weight", "8x4x3x3", "288", DECAY, "-", "0.01 to init", "0.1 dim=1", "-", "-", "-",
     "decay:2 l2:6 group_lasso:6"),
    ("head.weight", "5x8", "40", DECAY, "-", "0.5 to ref cosine to 0.1 over 1000", "-", "-", "2.0 dim=1", "0.1",
     "decay:2 l2:7 max_norm:7 lr_mult:8"),
    # lr_mult is an optimizer setting: 'exclude bias' leaves it, and 'set by' says both.
    ("head.bias", "5", "5", "-", "-", "-", "-", "-", "-", "0.1", "excluded:3 lr_mult:8"),
]
MODULE_HEADER = ["module output", "class", "activity l1", "activity l2", "set by (line)"]
MODULE_ROWS = [  # modules with an activity term, in registration order
    ("act1", "ReLU", "0.001 from 10 until 500", "-", "activity l1:9"),
    ("act2", "ReLU", "0.001 from 10 until 500", "0.002 warmup 20", "activity l1:9 activity l2:11"),
    ("pool", "AdaptiveAvgPool2d", "-", "0.5", "activity l2:10"),
]


def resolved(text: str, filename: str = "terms.reg"):
    return resolve(regdsl.parse(text, filename), act_cnn())


def tables(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """The parameter table and the module-output table of format_explain's text, as aligned cells."""
    params, _, modules = text.partition("\n\n")
    return aligned_cells(params.split("\n"), right={2}), aligned_cells(modules.split("\n"), right=set())


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The function behind the entry point, in this process: exit status, stdout, stderr."""
    from regdsl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    path = tmp_path / "terms.reg"
    path.write_text(RULES, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- the rule file itself


def test_rules_are_canonical_as_written_by_hand_and_check_clean() -> None:
    spec = regdsl.parse(RULES, "terms.reg")
    assert spec.to_source() == CANONICAL
    # Every term's cell in the table is its canonical text without the keyword.
    canonical_lines = CANONICAL.splitlines()
    for kind, cell, line in [
        ("decay", DECAY, 1), ("l1", "0.0001 prox warmup 100", 4), ("orthogonal", "0.001", 4),
        ("l2", "0.01 to init", 5), ("group_lasso", "0.1 dim=1", 5),
        ("max_norm", "2.0 dim=1", 6), ("l2", "0.5 to ref cosine to 0.1 over 1000", 6), ("lr_mult", "0.1", 7),
        ("activity l1", "0.001 from 10 until 500", 8), ("activity l2", "0.5", 9), ("activity l2", "0.002 warmup 20", 10),
    ]:
        assert f" {kind} {cell}" in f" {canonical_lines[line - 1]} ", (kind, cell)
    # Nothing in RULES is dead, unusable or doubled (decay + l2 toward init/ref is not RD204).
    assert regdsl.check(spec, act_cnn()) == []


# ---------------------------------------------------------------- table


def test_explain_table_has_a_column_per_kind_used_and_a_module_output_table() -> None:
    resolution = resolved(RULES)
    params, modules = tables(format_explain(list(resolution.rows), list(resolution.modules)))
    assert params[0] == PARAM_HEADER
    assert [tuple(c) for c in params[1:]] == PARAM_ROWS
    assert modules[0] == MODULE_HEADER
    assert [tuple(c) for c in modules[1:]] == MODULE_ROWS


def test_compiled_regularizer_explains_the_same() -> None:
    model = act_cnn()
    reg = regdsl.parse(RULES, "terms.reg").compile(model, reference=model.state_dict())
    params, modules = tables(format_explain(reg.explain(), reg.explain_modules()))
    assert [tuple(c) for c in params[1:]] == PARAM_ROWS
    assert [tuple(c) for c in modules[1:]] == MODULE_ROWS
    reg.detach()


def test_only_decay_l1_l2_are_always_shown_and_no_module_table_without_activity() -> None:
    resolution = resolved("all decay 0.05\nexclude bias\nlayer head.weight max_norm 3\n")
    text = format_explain(list(resolution.rows), list(resolution.modules))
    assert "\n\n" not in text and "module output" not in text
    cells = aligned_cells(text.split("\n"), right={2})
    assert cells[0] == ["parameter", "shape", "numel", "decay", "l1", "l2", "max_norm", "set by (line)"]
    assert cells[6] == ["head.weight", "5x8", "40", "0.05", "-", "-", "3.0", "decay:1 max_norm:3"]


def test_explain_table_marks_excluded_modules_and_none_keeps_lr_mult() -> None:
    text = (
        "all activity l1 1e-3\n"  # every module without submodules: all seven are leaves
        "exclude type ReLU\n"  # removes the activity term from act1 and act2
        "layer head.** lr_mult 0.1 l1 1e-3\n"
        "layer head.weight none\n"  # clears l1, not lr_mult
    )
    resolution = resolved(text)
    params, modules = tables(format_explain(list(resolution.rows), list(resolution.modules)))
    assert params[0] == ["parameter", "shape", "numel", "decay", "l1", "l2", "lr_mult", "set by (line)"]
    assert params[6] == ["head.weight", "5x8", "40", "-", "-", "-", "0.1", "lr_mult:3"]
    assert params[7] == ["head.bias", "5", "5", "-", "0.001", "-", "0.1", "l1:3 lr_mult:3"]
    assert [tuple(c) for c in modules[1:]] == [
        ("conv1", "Conv2d", "0.001", "-", "activity l1:1"),
        ("bn1", "BatchNorm2d", "0.001", "-", "activity l1:1"),
        ("act1", "ReLU", "-", "-", "excluded:2"),
        ("conv2", "Conv2d", "0.001", "-", "activity l1:1"),
        ("act2", "ReLU", "-", "-", "excluded:2"),
        ("pool", "AdaptiveAvgPool2d", "0.001", "-", "activity l1:1"),
        ("head", "Linear", "0.001", "-", "activity l1:1"),
    ]
    head_weight = explain_records(list(resolution.rows))["parameters"][5]
    assert head_weight["cleared_by"] == {"file": "terms.reg", "line": 4, "column": 19}
    assert head_weight["terms"] == {"lr_mult": {"value": 0.1, "text": "0.1", "file": "terms.reg", "line": 3, "column": 15}}


def test_cli_explain_table(capsys: pytest.CaptureFixture[str], rules_file: str) -> None:
    code, out, err = _main(capsys, "explain", rules_file, "--model", MODEL)
    assert (code, err) == (0, "")
    lines = out.rstrip("\n").split("\n")
    assert lines[0] == f"{rules_file} on {MODEL}: 7 tensors (7 trainable), 453 elements"
    assert lines[1] == f"'set by' names the term and the line of {rules_file} that set it."
    assert lines[2] == ""
    params, modules = tables("\n".join(lines[3:]))
    assert [params[0], *map(list, PARAM_ROWS)] == params
    assert [modules[0], *map(list, MODULE_ROWS)] == modules and modules[0] == MODULE_HEADER


# ---------------------------------------------------------------- JSON


def _term(value: float, text: str, file: str, line: int, column: int) -> dict[str, object]:
    return {"value": value, "text": text, "file": file, "line": line, "column": column}


def expected_records(file: str) -> dict[str, object]:
    """explain_records for RULES, by hand. Columns: each term's keyword in its line of RULES."""
    decay = _term(0.05, DECAY, file, 2, 5)  # 'all decay ...'
    excluded = {"file": file, "line": 3, "column": 1}

    def param(name, shape, numel, terms, excluded_by=None):
        return {"name": name, "aliases": [], "shape": shape, "numel": numel, "trainable": True,
                "excluded_by": excluded_by, "cleared_by": None, "terms": terms}

    def module(name, cls, terms):
        return {"name": name, "class": cls, "excluded_by": None, "cleared_by": None, "terms": terms}

    activity_l1 = _term(1e-3, "0.001 from 10 until 500", file, 9, 11)  # 'type ReLU activity ...'
    return {
        "parameters": [
            param("conv1.weight", [4, 3, 3, 3], 108, {
                "decay": decay,
                "l1": _term(1e-4, "0.0001 prox warmup 100", file, 5, 20),  # 'layer conv1.weight l1'
                "orthogonal": _term(1e-3, "0.001", file, 5, 44),
            }),
            param("conv1.bias", [4], 4, {}, excluded),
            param("bn1.weight", [4], 4, {"decay": _term(0.0, "0.0", file, 4, 6)}),  # 'norm decay 0'
            param("bn1.bias", [4], 4, {}, excluded),
            param("conv2.weight", [8, 4, 3, 3], 288, {
                "decay": decay,
                "l2": _term(0.01, "0.01 to init", file, 6, 20),
                "group_lasso": _term(0.1, "0.1 dim=1", file, 6, 36),
            }),
            param("head.weight", [5, 8], 40, {
                "decay": decay,
                "l2": _term(0.5, "0.5 to ref cosine to 0.1 over 1000", file, 7, 36),
                "max_norm": _term(2.0, "2.0 dim=1", file, 7, 19),  # 'layer head.weight max_norm'
                "lr_mult": _term(0.1, "0.1", file, 8, 15),  # 'layer head.** lr_mult'
            }),
            param("head.bias", [5], 5, {"lr_mult": _term(0.1, "0.1", file, 8, 15)}, excluded),
        ],
        "modules": [
            module("act1", "ReLU", {"activity_l1": activity_l1}),
            module("act2", "ReLU", {
                "activity_l1": activity_l1,
                "activity_l2": _term(2e-3, "0.002 warmup 20", file, 11, 12),  # 'layer act2 activity'
            }),
            module("pool", "AdaptiveAvgPool2d", {"activity_l2": _term(0.5, "0.5", file, 10, 12)}),
        ],
    }


def test_explain_records() -> None:
    resolution = resolved(RULES)
    document = explain_records(list(resolution.rows), list(resolution.modules))
    assert json.loads(json.dumps(document)) == document  # plain JSON types only
    assert document == expected_records("terms.reg")


def test_cli_explain_json(capsys: pytest.CaptureFixture[str], rules_file: str) -> None:
    code, out, err = _main(capsys, "explain", rules_file, "--model", MODEL, "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == expected_records(rules_file)


# ---------------------------------------------------------------- CSV

CSV_HEADER = [
    "name", "aliases", "shape", "numel", "trainable", "excluded_by_line",
    *[c for k in KINDS for c in (k, f"{k}_line")],
]
CSV_ROWS = [
    # name, aliases, shape, numel, trainable, excluded_by_line, then (value, line) per kind, then details
    ["conv1.weight", "", "4x3x3x3", "108", "True", "", "0.05", "2", "0.0001", "5", "", "", "", "", "0.001", "5",
     "", "", "", "", "decay 0.05 warmup 100; l1 0.0001 prox warmup 100"],
    ["conv1.bias", "", "4", "4", "True", "3", *[""] * 14, ""],
    ["bn1.weight", "", "4", "4", "True", "", "0.0", "4", *[""] * 12, ""],
    ["bn1.bias", "", "4", "4", "True", "3", *[""] * 14, ""],
    ["conv2.weight", "", "8x4x3x3", "288", "True", "", "0.05", "2", "", "", "0.01", "6", "0.1", "6", "", "",
     "", "", "", "", "decay 0.05 warmup 100; l2 0.01 to init; group_lasso 0.1 dim=1"],
    ["head.weight", "", "5x8", "40", "True", "", "0.05", "2", "", "", "0.5", "7", "", "", "", "", "2.0", "7",
     "0.1", "8", "decay 0.05 warmup 100; l2 0.5 to ref cosine to 0.1 over 1000; max_norm 2.0 dim=1"],
    ["head.bias", "", "5", "5", "True", "3", *[""] * 12, "0.1", "8", ""],
]


def test_explain_csv_has_details_for_options_and_schedules(capsys: pytest.CaptureFixture[str], rules_file: str) -> None:
    expected = [[*CSV_HEADER, "details"], *CSV_ROWS]
    assert list(csv.reader(io.StringIO(explain_csv(list(resolved(RULES).rows))))) == expected
    code, out, err = _main(capsys, "explain", rules_file, "--model", MODEL, "--format", "csv")
    assert code == 0 and err.startswith("regdsl: note: the CSV lists parameters; the activity terms of 3 modules (act1, act2, pool)")
    assert list(csv.reader(io.StringIO(out))) == expected


@pytest.mark.parametrize(
    "text, details",
    [
        # Plain values only (max_norm's default dim=0 and lr_mult have no options): no details column.
        ("all decay 0.05\nlayer head.weight max_norm 3 orthogonal 1e-3\nlayer head.** lr_mult 2\n", None),
        # An activity term's schedule is not a parameter's: activity terms are not in the CSV.
        ("all l2 1e-4\nlayer act1 activity l1 1e-3 warmup 5\n", None),
        ("layer head.weight max_norm 3 dim=1\n", "max_norm 3.0 dim=1"),
        ("layer head.weight l1 1e-3 prox\n", "l1 0.001 prox"),
        ("layer head.weight l2 1e-3 to init\n", "l2 0.001 to init"),
        ("layer head.weight group_lasso 1e-3 until 9\n", "group_lasso 0.001 until 9"),
        ("layer head.weight decay 0.1 cosine to 0.01 over 50\n", "decay 0.1 cosine to 0.01 over 50"),
    ],
)
def test_explain_csv_details_column_only_when_a_term_has_options(text: str, details: str | None) -> None:
    table = list(csv.reader(io.StringIO(explain_csv(list(resolved(text).rows)))))
    assert ("details" in table[0]) == (details is not None)
    assert len(table) == 1 + 7 and all(len(r) == len(table[0]) for r in table)
    if details is not None:
        assert table[0][-1] == "details"
        by_name = {r[0]: r[-1] for r in table[1:]}
        assert by_name == {**{n: "" for n in by_name}, "head.weight": details}


# ---------------------------------------------------------------- --group

# Trainable tensors by (decay term, lr_mult), in the order of each group's first tensor:
# conv1.weight and conv2.weight: decay 0.05 warmup 100; conv1.bias, bn1.bias (excluded) and bn1.weight
# (decay 0): no decay; head.weight: the scheduled decay and lr_mult 0.1; head.bias: excluded, lr_mult 0.1.
GROUPS = [
    {"name": "decay=0.05 warmup 100", "weight_decay": 0.05, "schedule": "warmup 100", "lr_mult": 1.0,
     "tensors": 2, "elements": 108 + 288, "params": ["conv1.weight", "conv2.weight"]},
    {"name": "no_decay", "weight_decay": 0.0, "schedule": "", "lr_mult": 1.0,
     "tensors": 3, "elements": 12, "params": ["conv1.bias", "bn1.weight", "bn1.bias"]},
    {"name": "decay=0.05 warmup 100 lr_mult=0.1", "weight_decay": 0.05, "schedule": "warmup 100", "lr_mult": 0.1,
     "tensors": 1, "elements": 40, "params": ["head.weight"]},
    {"name": "no_decay lr_mult=0.1", "weight_decay": 0.0, "schedule": "", "lr_mult": 0.1,
     "tensors": 1, "elements": 5, "params": ["head.bias"]},
]
GROUP_TABLE = [
    ["group", "weight_decay", "schedule", "lr_mult", "tensors", "elements"],
    ["decay=0.05 warmup 100", "0.05", "warmup 100", "1", "2", "396"],
    ["no_decay", "0", "-", "1", "3", "12"],
    ["decay=0.05 warmup 100 lr_mult=0.1", "0.05", "warmup 100", "0.1", "1", "40"],
    ["no_decay lr_mult=0.1", "0", "-", "0.1", "1", "5"],
]
GROUP_CSV = [
    ["name", "weight_decay", "schedule", "lr_mult", "tensors", "elements"],
    ["decay=0.05 warmup 100", "0.05", "warmup 100", "1.0", "2", "396"],
    ["no_decay", "0.0", "", "1.0", "3", "12"],
    ["decay=0.05 warmup 100 lr_mult=0.1", "0.05", "warmup 100", "0.1", "1", "40"],
    ["no_decay lr_mult=0.1", "0.0", "", "0.1", "1", "5"],
]


def test_groups_split_by_scheduled_decay_and_lr_mult() -> None:
    groups = resolved(RULES).groups_summary()
    assert group_records(groups) == GROUPS
    assert aligned_cells(format_groups(groups).split("\n"), right={4, 5}) == GROUP_TABLE
    assert list(csv.reader(io.StringIO(groups_csv(groups)))) == GROUP_CSV
    # The groups are the ones the optimizer gets, with lr = lr_mult * lr.
    model = act_cnn()
    reg = regdsl.parse(RULES, "terms.reg").compile(model, reference=model.state_dict())
    names = dict(model.named_parameters())
    built = [
        (g["name"], g["weight_decay"], g.get("lr"), [next(n for n, p in names.items() if p is q) for q in g["params"]])
        for g in reg.param_groups(lr=1.0)
    ]
    # A scheduled decay is 0 at step 0 (warmup from 0); lr is the base lr times lr_mult.
    assert built == [
        ("decay=0.05 warmup 100", 0.0, 1.0, ["conv1.weight", "conv2.weight"]),
        ("no_decay", 0.0, 1.0, ["conv1.bias", "bn1.weight", "bn1.bias"]),
        ("decay=0.05 warmup 100 lr_mult=0.1", 0.0, 0.1, ["head.weight"]),
        ("no_decay lr_mult=0.1", 0.0, 0.1, ["head.bias"]),
    ]
    reg.detach()


def test_cli_explain_group_table_json_csv(capsys: pytest.CaptureFixture[str], rules_file: str) -> None:
    explain = ("explain", rules_file, "--model", MODEL, "--group")
    code, out, err = _main(capsys, *explain)
    assert (code, err) == (0, "")
    assert aligned_cells(out.rstrip("\n").split("\n"), right={4, 5}) == GROUP_TABLE
    code, out, err = _main(capsys, *explain, "--format", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == GROUPS
    code, out, err = _main(capsys, *explain, "--format", "csv")
    assert (code, err) == (0, "")
    assert list(csv.reader(io.StringIO(out))) == GROUP_CSV


@pytest.mark.parametrize(
    "text, table",
    [
        # Neither a schedule nor an lr_mult: neither column.
        ("all decay 0.05\nexclude bias\n", [
            ["group", "weight_decay", "tensors", "elements"],
            ["decay=0.05", "0.05", "4", "440"],  # conv1.weight 108, bn1.weight 4, conv2.weight 288, head.weight 40
            ["no_decay", "0", "3", "13"],  # conv1.bias 4, bn1.bias 4, head.bias 5
        ]),
        # The same strength with and without a schedule: two groups; a schedule column, no lr_mult column.
        ("all decay 0.05\nlayer head.** decay 0.05 warmup 100\n", [
            ["group", "weight_decay", "schedule", "tensors", "elements"],
            ["decay=0.05", "0.05", "-", "5", "408"],
            ["decay=0.05 warmup 100", "0.05", "warmup 100", "2", "45"],
        ]),
        # lr_mult without a schedule; a decay of 0 with a warmup is still no decay at every step.
        ("all decay 0.05\nnorm decay 0 warmup 10\nlayer head.** lr_mult 0.1\n", [
            ["group", "weight_decay", "lr_mult", "tensors", "elements"],
            ["decay=0.05", "0.05", "1", "3", "400"],  # conv1.weight, conv1.bias, conv2.weight
            ["no_decay", "0", "1", "2", "8"],  # bn1.weight, bn1.bias
            ["decay=0.05 lr_mult=0.1", "0.05", "0.1", "2", "45"],
        ]),
    ],
)
def test_group_table_shows_schedule_and_lr_mult_columns_only_when_used(text: str, table: list[list[str]]) -> None:
    groups = resolved(text).groups_summary()
    right = {len(table[0]) - 2, len(table[0]) - 1}
    assert aligned_cells(format_groups(groups).split("\n"), right=right) == table


# ---------------------------------------------------------------- check on the new example files


def test_cli_check_passes_on_the_rules_and_the_golden_clean_file(
    capsys: pytest.CaptureFixture[str], rules_file: str
) -> None:
    clean = str(TESTS / "data" / "check" / "act_cnn_new_terms_clean.reg")
    code, out, err = _main(capsys, "check", rules_file, clean, "--model", MODEL, "--strict")
    assert (code, err) == (0, "")
    # 10 statements in RULES, 10 in the clean golden file.
    assert out.rstrip("\n").split("\n")[-1] == "All checks passed: 2 files, 20 statements."


def test_cli_check_on_the_cnn_example(capsys: pytest.CaptureFixture[str]) -> None:
    # examples/cnn.reg on examples/train_cnn.py's SmallCNN (channels 8, classes 4):
    # conv1.weight 8x1x3x3 = 72, conv1.bias 8, conv2.weight 16x8x3x3 = 1,152, conv2.bias 16,
    # head.weight 4x16 = 64, head.bias 4. 'all decay' reaches the three weights ('exclude bias' the rest);
    # l2 to init and orthogonal: conv1.weight; group_lasso: conv2.weight; l1 prox and max_norm: head.weight.
    rules, model = str(ROOT / "examples" / "cnn.reg"), f"{ROOT / 'examples' / 'train_cnn.py'}:SmallCNN"
    code, out, err = _main(capsys, "check", rules, "--model", model, "--strict", "--format", "json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["diagnostics"] == [] and document["summary"] == {"errors": 0, "warnings": 0}

    def count(tensors: int, elements: int) -> dict[str, int]:
        return {"tensors": tensors, "elements": elements}

    assert document["files"] == [{
        "file": rules, "statements": 8,
        "coverage": {
            "terms": {
                "decay": count(3, 72 + 1152 + 64), "l1": count(1, 64), "l2": count(1, 72),
                "group_lasso": count(1, 1152), "orthogonal": count(1, 72), "max_norm": count(1, 64),
            },
            "nothing": count(3, 8 + 16 + 4), "excluded": count(3, 8 + 16 + 4), "frozen": count(0, 0),
        },
    }]
    code, out, err = _main(capsys, "check", rules, "--model", model)
    assert (code, err) == (0, "")
    assert out.rstrip("\n").split("\n")[-1] == "All checks passed: 1 file, 8 statements."


# ---------------------------------------------------------------- check: what the goldens cannot mark as a known bug


def test_exclude_that_removes_an_activity_term_is_not_unmatched() -> None:
    # 'exclude type ReLU' removes the activity term of act1 and act2 (explain shows 'excluded:2' for
    # them, test_explain_table_marks_excluded_modules_and_none_keeps_lr_mult), so it matches something.
    spec = regdsl.parse("all activity l1 1e-3\nexclude type ReLU\nexclude layer pool\n", "r.reg")
    assert regdsl.check(spec, act_cnn()) == []


def test_none_that_clears_an_activity_term_is_not_unmatched() -> None:
    spec = regdsl.parse("all activity l1 1e-3\nlayer act1 none\n", "r.reg")
    resolution = resolve(spec, act_cnn())
    (act1,) = [m for m in resolution.modules if m.name == "act1"]
    assert act1.terms == {} and act1.cleared_by.pos.line == 2  # the none did clear it, and explain says so
    assert regdsl.check(spec, act_cnn()) == []


@pytest.mark.parametrize(
    "text, l2_column",
    [
        ("all decay 0 cosine to 0.01 over 100\nlayer head.weight l2 0.1\n", 19),  # the decay grows from 0 to 0.01
        ("all decay 0.01\nlayer head.weight l2 0 cosine to 0.1 over 100\n", 19),  # the l2 grows from 0 to 0.1
    ],
)
def test_decay_and_l2_that_start_at_zero_but_grow_are_rd204(text: str, l2_column: int) -> None:
    found = [(d.line, d.column, d.code) for d in regdsl.check(regdsl.parse(text, "r.reg"), act_cnn())]
    assert found == [(2, l2_column, "RD204")]


def test_a_decay_that_grows_from_zero_is_named_by_its_term_and_lr_mult_1_adds_no_group() -> None:
    # act_cnn: conv1.weight/bias, bn1.weight/bias, conv2.weight, head.weight/bias, in that order.
    text = "all decay 0 cosine to 0.01 over 100\nexclude bias\nexclude norm\nlayer head.** lr_mult 1\n"
    groups = resolve(regdsl.parse(text), act_cnn()).groups_summary()
    # lr_mult 1 is the optimizer's own lr, so head.weight shares the group of the other weights.
    assert [(g.name, g.params) for g in groups] == [
        ("decay=0.0 cosine to 0.01 over 100", ("conv1.weight", "conv2.weight", "head.weight")),
        ("no_decay", ("conv1.bias", "bn1.weight", "bn1.bias", "head.bias")),
    ]


def test_a_rule_with_an_activity_term_is_never_dead() -> None:
    # Line 2 overrides line 1's l2 everywhere, but line 1's activity term still acts on conv1's output.
    spec = regdsl.parse("layer conv1 l2 0.1 activity l1 0.5\nall l2 0.2\n", "r.reg")
    assert regdsl.check(spec, act_cnn()) == []
