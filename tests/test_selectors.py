"""Selectors mean what users mean: `bias` names, `type` through base classes, parametrized
tensors under the name users write, and wrapped layers read through their wrappers, the same
way in check, explain and compile.

Expected names, values and penalties are written by hand from each model's structure; a
penalty is compared with the formula applied to tensors the test fetches by torch's own names.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import regdsl
from regdsl import RegCompileError
from regdsl.report import explain_csv, explain_records, format_explain
from regdsl.resolution import resolve

ENCODER = ["self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias"]
ENCODER += [f"{m}.{k}" for m in ("linear1", "linear2", "norm1", "norm2") for k in ("weight", "bias")]


def picked(text: str, model: nn.Module) -> list[str]:
    """What the first statement selects, by the names regdsl reports (resolve: no strictness)."""
    res = resolve(regdsl.parse(text), model)
    return [res.table.entries[i].name for i in res.matches[0]]


def codes(text: str, model: nn.Module) -> list[str]:
    return [d.code for d in regdsl.check(regdsl.parse(text), model)]


def encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)


def base_note(line: int, pattern: str, cls: str, base: str) -> str:
    return f"line {line}: 'type {pattern}' matched {cls} through its base class {base}"


# ---------------------------------------------------------------- bias


def test_bias_includes_names_ending_in_bias() -> None:
    layer = encoder_layer()
    assert picked("bias decay 0", layer) == [n for n in ENCODER if n.endswith("bias")]
    assert "self_attn.in_proj_bias" in picked("bias decay 0", layer)
    groups = regdsl.parse("all decay 0.1\nexclude bias\nexclude norm\n").compile(layer).param_groups()
    params = dict(layer.named_parameters())
    decayed = [n for n in ENCODER if n.endswith("weight") and not n.startswith("norm")]
    assert [g["params"] for g in groups if g["weight_decay"] == 0.1] == [[params[n] for n in decayed]]


# ---------------------------------------------------------------- type: the class or a base class


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame stands in here: a Conv2d subclass with its own forward ('same' padding, k=3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1)))


def conv_same_class() -> type[nn.Conv2d]:
    try:
        from timm.layers import Conv2dSame as timm_conv  # the real one when timm is installed
    except ImportError:
        return Conv2dSame
    return timm_conv


def test_type_linear_reaches_multihead_attentions_out_proj() -> None:
    layer = encoder_layer()
    linears = [n for n in ENCODER if n.split(".")[-2] in ("out_proj", "linear1", "linear2")]
    assert picked("type Linear l1 1", layer) == linears
    assert picked("type NonDynamicallyQuantizableLinear l1 1", layer) == linears[:2]
    assert codes("all decay 0.1\ntype Linear l1 1e-5\n", layer) == []
    rows = {r.name: r for r in resolve(regdsl.parse("all decay 0.1\ntype Linear l1 1e-5\n"), layer).rows}
    note = base_note(2, "Linear", "NonDynamicallyQuantizableLinear", "Linear")
    assert {n: r.notes for n, r in rows.items() if r.notes} == {n: (note,) for n in linears[:2]}
    # When a pattern names the class itself, nothing needs saying.
    both = "all decay 0.1\ntype Linear, NonDynamicallyQuantizableLinear l1 1e-5\n"
    assert all(not r.notes for r in resolve(regdsl.parse(both), layer).rows)


def test_type_conv2d_reaches_a_conv2d_subclass_in_compile_and_activity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_same_class()(3, 4, 3), nn.ReLU(), conv_same_class()(4, 2, 3))
    assert regdsl.check(regdsl.parse("type Conv2d l2 0.5\n"), model) == []
    reg = regdsl.parse("type Conv2d l2 0.5\n").compile(model)
    expected = 0.25 * sum((p.detach() ** 2).sum() for p in model.parameters())
    torch.testing.assert_close(reg.penalty(), expected)

    reg = regdsl.parse("type Conv2d activity l2 0.5\n").compile(model)
    name = type(model[0]).__name__
    assert [(m.name, m.class_name, m.notes) for m in reg.explain_modules()] == [
        (i, name, (base_note(1, "Conv2d", name, "Conv2d"),)) for i in ("0", "2")
    ]
    x = torch.randn(2, 3, 5, 5)
    model(x)
    with torch.no_grad():
        a0 = model[0](x)
        a2 = model[2](torch.relu(a0))
    torch.testing.assert_close(reg.penalty(), 0.25 * ((a0**2).sum() + (a2**2).sum()) / 2)


def test_rd102_reads_base_classes_and_stops_before_nn_module() -> None:
    attention_only = nn.Sequential(nn.MultiheadAttention(4, 2))
    assert codes("type Linear l1 1e-5\n", attention_only) == []  # out_proj is a Linear
    assert codes("type Conv2d l1 1e-5\n", attention_only) == ["RD102"]
    # nn.Module is no base class a 'type' sees: it would make 'type Module' mean 'all'.
    assert codes("type Module l1 1e-5\n", attention_only) == ["RD102"]


def test_explain_renders_base_class_notes_and_nothing_more_without_them() -> None:
    layer = encoder_layer()
    rules = "all decay 0.1\nexclude type Linear\nexclude norm\n"
    res = resolve(regdsl.parse(rules), layer)
    table = format_explain(res.rows).split("\n")
    note = base_note(2, "Linear", "NonDynamicallyQuantizableLinear", "Linear")
    assert table[-2:] == ["Notes:", f"  [1] {note}"]
    by_name = {line.split()[0]: line.split("  ")[-1].strip() for line in table[2:-3]}
    assert by_name["self_attn.out_proj.weight"] == "excluded:2 [1]"
    assert by_name["linear1.weight"] == "excluded:2"
    records = {r["name"]: r for r in explain_records(res.rows)["parameters"]}
    assert records["self_attn.out_proj.bias"]["notes"] == [note]
    assert "notes" not in records["linear1.bias"]
    sheet = list(csv.reader(io.StringIO(explain_csv(res.rows))))
    assert sheet[0][-1] == "notes"
    assert {r[0]: r[-1] for r in sheet[1:]}["self_attn.out_proj.weight"] == note
    # No base-class match, no notes: the renderings are the ones a plain model always had.
    plain = resolve(regdsl.parse("all decay 0.1\nexclude type Linear\n"), nn.Sequential(nn.Linear(2, 2)))
    assert "Notes" not in format_explain(plain.rows)
    assert "notes" not in explain_records(plain.rows)["parameters"][0]
    assert "notes" not in explain_csv(plain.rows).split("\n")[0]


# ---------------------------------------------------------------- parametrized tensors


class Doubled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def _old(apply):  # torch.nn.utils.weight_norm and spectral_norm are deprecated (FutureWarning)
    def run(module: nn.Module, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            apply(module, **kwargs)

    return run


# name: (apply to fc1, regdsl's names of fc1's weight, torch's names of the same tensors, what computes it)
PARAMETRIZED = {
    "weight_norm": (parametrizations.weight_norm, ["fc1.weight.original0", "fc1.weight.original1"],
                    ["fc1.parametrizations.weight.original0", "fc1.parametrizations.weight.original1"], "_WeightNorm"),
    "spectral_norm": (parametrizations.spectral_norm, ["fc1.weight.original"],
                      ["fc1.parametrizations.weight.original"], "_SpectralNorm"),
    "register_parametrization": (lambda m: parametrize.register_parametrization(m, "weight", Doubled()),
                                 ["fc1.weight.original"], ["fc1.parametrizations.weight.original"], "Doubled"),
    "old_weight_norm": (_old(torch.nn.utils.weight_norm), ["fc1.weight_g", "fc1.weight_v"],
                        ["fc1.weight_g", "fc1.weight_v"], "torch.nn.utils.weight_norm"),
    "old_spectral_norm": (_old(torch.nn.utils.spectral_norm), ["fc1.weight_orig"], ["fc1.weight_orig"],
                          "torch.nn.utils.spectral_norm"),
}  # fmt: skip


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def two_layers(kind: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = TwoLayers()
    if kind is not None:
        PARAMETRIZED[kind][0](model.fc1)
    return model


def originals_note(how: str, attribute: str = "weight") -> str:
    return (
        f"an original of a parametrized {attribute} ({how}): terms act on this tensor, which the optimizer "
        f"updates, not on the {attribute} computed from it"
    )


@pytest.mark.parametrize("kind", sorted(PARAMETRIZED))
def test_a_parametrized_weight_is_found_under_the_name_users_write(kind: str) -> None:
    _, names, torch_names, how = PARAMETRIZED[kind]
    model = two_layers(kind)
    # torch registers the originals after the layer's own bias.
    assert picked("layer fc1.* l2 1", model) == ["fc1.bias", *names]
    assert picked("layer fc1.weight l2 1", model) == names
    assert picked("type Linear l2 1", model) == ["fc1.bias", *names, "fc2.weight", "fc2.bias"]
    assert picked("bias l2 1", model) == ["fc1.bias", "fc2.bias"]
    assert codes("layer fc1.weight l2 0.5\ntype Linear decay 0.1\n", model) == ["RD204"]  # and no RD101/RD102
    # The loss term acts on the originals: l2 0.5 is 0.25 · Σ original², over torch's own tensors.
    params = dict(model.named_parameters())
    reg = regdsl.parse("layer fc1.weight l2 0.5\n").compile(model)
    torch.testing.assert_close(reg.penalty(), 0.25 * sum((params[n].detach() ** 2).sum() for n in torch_names))
    rows = {r.name: r for r in reg.explain()}
    assert {n: r.notes for n, r in rows.items() if r.notes} == {n: (originals_note(how),) for n in names}


def test_a_parametrized_bias_is_a_bias() -> None:
    model = two_layers()
    parametrize.register_parametrization(model.fc1, "bias", Doubled())
    assert picked("bias l2 1", model) == ["fc1.bias.original", "fc2.bias"]
    old = two_layers()
    _old(torch.nn.utils.weight_norm)(old.fc1, name="bias", dim=0)
    assert picked("bias l2 1", old) == ["fc1.bias_g", "fc1.bias_v", "fc2.bias"]


def test_l2_on_the_originals_is_sgd_weight_decay_on_them() -> None:
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with_rules, plain = two_layers("weight_norm"), two_layers("weight_norm")
    reg = regdsl.parse("all l2 0.1\n").compile(with_rules)
    opt = torch.optim.SGD(reg.param_groups(lr=0.5), lr=0.5)
    (F.mse_loss(with_rules(x), y) + reg.penalty()).backward()
    opt.step()
    reference = torch.optim.SGD(plain.parameters(), lr=0.5, weight_decay=0.1)
    F.mse_loss(plain(x), y).backward()
    reference.step()
    for (name, a), (_, b) in zip(with_rules.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_decay_and_to_ref_reach_the_originals() -> None:
    model = two_layers("weight_norm")
    params = dict(model.named_parameters())
    originals = [params[f"fc1.parametrizations.weight.original{i}"] for i in (0, 1)]
    groups = regdsl.parse("all decay 0.1\nexclude bias\n").compile(model).param_groups()
    assert [g["params"] for g in groups if g["weight_decay"] == 0.1] == [[*originals, params["fc2.weight"]]]
    # A state_dict of the same parametrized model is a reference under torch's own keys.
    reference = {k: v + 1 for k, v in model.state_dict().items()}
    reg = regdsl.parse("layer fc1.weight l2 1 to ref\n").compile(model, reference=reference)
    torch.testing.assert_close(reg.penalty(), torch.tensor(0.5 * sum(p.numel() for p in originals)))


def test_activity_terms_never_select_a_parametrizations_modules() -> None:
    model = two_layers("weight_norm")
    reg = regdsl.parse("all activity l1 1\n").compile(model)
    modules = [(m.name, m.class_name, m.notes) for m in reg.explain_modules()]
    assert modules == [("fc1", "Linear", ()), ("fc2", "Linear", ())]
    x = torch.randn(3, 4)
    model(x)
    with torch.no_grad():
        h = model.fc1(x)
        out = model.fc2(torch.relu(h))
    torch.testing.assert_close(reg.penalty(), (h.abs().sum() + out.abs().sum()) / 3)


def test_weight_normed_bert_layer() -> None:
    pytest.importorskip("transformers")
    from models import bert

    model = bert()
    dense = "bert.encoder.layer.0.intermediate.dense"
    parametrizations.weight_norm(model.bert.encoder.layer[0].intermediate.dense)
    rules = "all decay 0.01\nexclude bias\nexclude norm\nexclude embedding\nlayer " + dense + ".weight l1 1e-3\n"
    assert regdsl.check(regdsl.parse(rules), model) == []
    names = [f"{dense}.weight.original0", f"{dense}.weight.original1"]
    assert picked(rules.splitlines()[-1], model) == names
    assert set(names) <= set(picked("type Linear l1 1", model))
    reg = regdsl.parse(rules).compile(model)
    rows = {r.name: r for r in reg.explain()}
    for name in names:
        assert {k: (s.value, s.pos.line) for k, s in rows[name].terms.items()} == {"decay": (0.01, 1), "l1": (1e-3, 5)}
        assert rows[name].notes == (originals_note("_WeightNorm"),)
    params = dict(model.named_parameters())
    originals = [params[f"{dense}.parametrizations.weight.original{i}"] for i in (0, 1)]
    torch.testing.assert_close(reg.penalty(), 1e-3 * sum(p.detach().abs().sum() for p in originals))


# ---------------------------------------------------------------- wrapped layers

FACTORY = """\
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


class Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        w = checkpoint_wrapper if wrap else (lambda m: m)
        self.fc1, self.ln, self.fc2 = w(nn.Linear(4, 8)), w(nn.LayerNorm(8)), w(nn.Linear(8, 2))

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def wrapped():
    torch.manual_seed(0)
    return Net(True)


def bare():
    torch.manual_seed(0)
    return Net(False)


def encoder():
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)


def weight_normed():
    net = Net(False)
    nn.utils.parametrizations.weight_norm(net.fc1)
    return net
"""

WRAPPED_RULES = "all decay 0.1\nexclude bias\ntype LayerNorm decay 0\ntype Linear l1 0.001\nlayer fc2 activity l2 0.5\n"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from regdsl.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_checkpoint_wrapped_model_reads_as_the_bare_one_in_check_explain_and_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    (tmp_path / "factory.py").write_text(FACTORY, encoding="utf-8")
    (tmp_path / "rules.reg").write_text(WRAPPED_RULES, encoding="utf-8")
    rules, factory = str(tmp_path / "rules.reg"), tmp_path / "factory.py"
    for command in (["check"], ["explain"], ["explain", "--format", "json"], ["explain", "--format", "csv"]):
        runs = {m: _cli(capsys, *command, rules, "--model", f"{factory}:{m}") for m in ("wrapped", "bare")}
        code, out, err = runs["wrapped"]
        assert code == 0, out
        assert err == ("" if command[-1] != "csv" else runs["bare"][2]), err  # the CSV's note on activity terms, alike
        assert "RD102" not in out
        assert out.replace(":wrapped", ":bare") == runs["bare"][1], command

    spec = regdsl.parse(WRAPPED_RULES)
    loader = importlib.util.spec_from_file_location("wrapped_factory", factory)
    models = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(models)
    wrapped, bare = models.wrapped(), models.bare()
    assert regdsl.check(spec, wrapped) == []
    assert resolve(spec, wrapped).rows == resolve(spec, bare).rows
    reg, plain = spec.compile(wrapped), spec.compile(bare)
    assert reg.groups_summary() == plain.groups_summary()
    x = torch.randn(3, 4)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # backward reruns all of fc2's forward
        out = wrapped(x)
        first = reg.penalty()
        (out.sum() + first).backward()
        wrapped(x)
        second = reg.penalty()  # the recomputation during backward added nothing to it
    weights = bare.fc1.weight.detach().abs().sum() + bare.fc2.weight.detach().abs().sum()
    expected = 0.001 * weights + 0.25 * (out.detach() ** 2).sum() / 3
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    bare(x)
    torch.testing.assert_close(plain.penalty(), expected)


def test_cli_explain_prints_the_notes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "factory.py").write_text(FACTORY, encoding="utf-8")
    (tmp_path / "rules.reg").write_text("all decay 0.1\ntype Linear l1 1e-5\nexclude norm\n", encoding="utf-8")
    rules, factory = str(tmp_path / "rules.reg"), tmp_path / "factory.py"
    code, out, err = _cli(capsys, "explain", rules, "--model", f"{factory}:encoder")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    row = next(line.split() for line in lines if line.startswith("self_attn.out_proj.weight "))
    assert row[-3:] == ["decay:1", "l1:2", "[1]"]
    assert next(line.split() for line in lines if line.startswith("linear1.weight "))[-2:] == ["decay:1", "l1:2"]
    note = base_note(2, "Linear", "NonDynamicallyQuantizableLinear", "Linear")
    assert lines[-3:] == ["", "Notes:", f"  [1] {note}"]

    code, out, err = _cli(capsys, "explain", rules, "--model", f"{factory}:weight_normed")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    for name in ("fc1.weight.original0", "fc1.weight.original1"):
        assert next(line.split() for line in lines if line.startswith(name + " "))[-3:] == ["decay:1", "l1:2", "[1]"]
    assert lines[-1] == f"  [1] {originals_note('_WeightNorm')}"
    records = json.loads(_cli(capsys, "explain", rules, "--model", f"{factory}:weight_normed", "--format", "json")[1])
    noted = {r["name"]: r["notes"] for r in records["parameters"] if "notes" in r}
    assert noted == {n: [originals_note("_WeightNorm")] for n in ("fc1.weight.original0", "fc1.weight.original1")}


class FSDPLike(nn.Module):
    """FSDP's layout, without a process group: the wrapped module sits under _fsdp_wrapped_module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._fsdp_wrapped_module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fsdp_wrapped_module(x)


def test_fsdp_and_torch_compile_wrapped_layers_keep_their_class() -> None:
    model = two_layers()
    model.ln = FSDPLike(nn.LayerNorm(3))
    model.fc1, model.fc2 = torch.compile(model.fc1), FSDPLike(model.fc2)
    rules = "type Linear l1 1e-3\ntype LayerNorm decay 0\n"
    assert regdsl.check(regdsl.parse(rules), model) == []
    assert picked(rules, model) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    table = resolve(regdsl.parse(rules), model).table
    assert [(n, type(m).__name__) for n, m in table.modules] == [
        ("", "TwoLayers"), ("fc1", "Linear"), ("fc2", "Linear"), ("ln", "LayerNorm")
    ]


def test_checkpoint_wrapped_gpt2_blocks() -> None:
    pytest.importorskip("transformers")
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    from models import gpt2

    rules = "all decay 0.1\nexclude bias\nexclude norm\nexclude embedding\ntype Conv1D l1 1e-6\n"
    rules += "type GPT2Block activity l2 1e-4\n"
    bare, wrapped = gpt2(), gpt2()
    for i, block in enumerate(wrapped.transformer.h):
        wrapped.transformer.h[i] = cw.checkpoint_wrapper(block)
    spec = regdsl.parse(rules)
    assert regdsl.check(spec, wrapped) == regdsl.check(spec, bare) == []
    res, plain = resolve(spec, wrapped), resolve(spec, bare)
    assert res.rows == plain.rows
    assert [(m.name, m.class_name) for m in res.modules] == [(f"transformer.h.{i}", "GPT2Block") for i in (0, 1)]
    assert res.modules == plain.modules


def test_gpt2_blocks_through_their_base_class() -> None:
    pytest.importorskip("transformers")
    from models import gpt2

    model = gpt2()
    block = type(model.transformer.h[0])
    if "GradientCheckpointingLayer" not in [c.__name__ for c in block.__mro__]:
        pytest.skip("this transformers has no GradientCheckpointingLayer")
    res = resolve(regdsl.parse("type GradientCheckpointingLayer activity l2 1e-4\n"), model)
    note = base_note(1, "GradientCheckpointingLayer", "GPT2Block", "GradientCheckpointingLayer")
    assert [(m.name, m.notes) for m in res.modules] == [(f"transformer.h.{i}", (note,)) for i in (0, 1)]
    assert codes("type GradientCheckpointingLayer activity l2 1e-4\n", model) == []
    # A mixin is no module class; the model's own base classes own no parameter directly.
    assert codes("type GenerationMixin l1 1\n", model) == ["RD102"]
    assert codes("type PreTrainedModel l1 1\n", model) == ["RD101"]
    with pytest.raises(RegCompileError):
        regdsl.parse("type GenerationMixin l1 1\n").compile(model)


def test_bias_selects_the_biases_of_recurrent_layers() -> None:
    # Before, torch's bias_ih_l0 / bias_hh_l0_reverse matched neither 'bias' nor '*_bias': 'exclude bias'
    # left them decayed, silently, and 'bias l1 ...' on an LSTM was RD101.
    model = nn.ModuleDict(
        {"rnn": nn.LSTM(3, 4, num_layers=2, bidirectional=True), "cell": nn.GRUCell(3, 4), "out": nn.Linear(4, 2)}
    )
    rows = regdsl.resolve(regdsl.parse("all decay 0.01\nexclude bias"), model).rows
    decayed = {r.name for r in rows if "decay" in r.terms}
    want = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("weight")}
    assert decayed == want
    assert regdsl.check(regdsl.parse("bias l1 1e-4"), nn.LSTM(3, 4)) == []


@pytest.mark.parametrize(
    ("pattern", "meant"),
    [
        ("fc1.parametrizations.weight", "fc1.weight"),  # the container's module, torch's name for it
        ("fc1.parametrizations.weight.original0", "fc1.weight.original0"),  # a state_dict key
        ("fc1.parametrizations.*", "fc1.*"),
        ("**.parametrizations.weight.original1", "**.weight.original1"),
    ],
)
def test_a_pattern_in_torchs_names_of_a_parametrization_says_what_to_write(pattern: str, meant: str) -> None:
    model = two_layers("weight_norm")
    assert picked(f"layer {meant} l2 1", model)  # what it says to write does select
    (d,) = regdsl.check(regdsl.parse(f"layer {pattern} l2 1\n"), model)
    assert d.code == "RD101" and d.column == 7
    assert d.message == (
        f"layer pattern '{pattern}' matches no parameter or module: regdsl names a parametrization's tensors "
        f"under the tensor they compute, without torch's 'parametrizations' segment: write '{meant}'"
    )


def test_a_pattern_through_a_wrapper_says_what_to_write() -> None:
    model = torch.compile(two_layers())  # torch's names start with _orig_mod.
    (d,) = regdsl.check(regdsl.parse("layer _orig_mod.fc*.weight l2 1\n"), model)
    assert d.message == (
        "layer pattern '_orig_mod.fc*.weight' matches no parameter or module: regdsl names tensors without "
        "wrapper segments ('_orig_mod'): write 'fc*.weight'"
    )
    # A pattern whose rewrite matches nothing either keeps the plain message and its nearest names.
    (d,) = regdsl.check(regdsl.parse("layer _orig_mod.fc3.weight l2 1\n"), model)
    assert d.message.startswith("layer pattern '_orig_mod.fc3.weight' matches no parameter or module; nearest: ")
    # An activity term selects modules, by the same names.
    (d,) = regdsl.check(regdsl.parse("layer _orig_mod.fc1 activity l1 1\n"), model)
    assert d.message == (
        "layer pattern '_orig_mod.fc1' matches no module (activity terms select modules by their own name): "
        "regdsl names modules without wrapper segments ('_orig_mod'): write 'fc1'"
    )
