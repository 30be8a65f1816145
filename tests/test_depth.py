"""Layer-wise lr decay: ``depth`` and ``lr_decay`` (docs/language.md, "Depth and lr_decay").

Expected scales come from timm's algorithm (``param_groups_layer_decay``), written out plainly
here: a layer id per parameter name, ``scale = D ** (max id − id)``. timm itself cannot be
imported in this environment; tests/test_integration_timm.py runs timm's own function on a
timm ViT and on HF-named modules to confirm this reference.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import regdsl
from regdsl import RegCompileError, RegValidationError

D = 0.75


def timm_scales(names: list[str], layer_id, decay: float = D) -> dict[str, float]:
    """timm: ``layer_max = max(ids)``, ``lr_scale = decay ** (layer_max - id)``, over every
    parameter, frozen ones included (timm's layer map is built from named_parameters())."""
    ids = {n: layer_id(n) for n in names}
    top = max(ids.values())
    return {n: decay ** (top - i) for n, i in ids.items()}


def regdsl_scales(reg: regdsl.Regularizer) -> dict[int, float]:
    """Each trainable tensor's lr_scale, as param_groups(lr_scale=True) gives timm's schedulers (1 if absent)."""
    return {id(p): g.get("lr_scale", 1.0) for g in reg.param_groups(lr_scale=True) for p in g["params"]}


def assert_same_scales(model: nn.Module, rules: str, expected: dict[str, float]) -> None:
    reg = regdsl.parse(rules).compile(model)
    got = regdsl_scales(reg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == {id(p) for p in trainable.values()}
    for name, p in trainable.items():
        assert got[id(p)] == expected[name], name  # bit for bit: the same float expression


# ---------------------------------------------------------------- Hugging Face models

def hf_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def hf_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=16, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def hf_layer_id(embeddings: str, blocks: str, n_layers: int):
    """timm's ids for an HF encoder: embeddings 0, block N -> N + 1, everything else L + 1."""

    def layer_id(name: str) -> int:
        if name.startswith(embeddings + "."):
            return 0
        if match := re.match(re.escape(blocks) + r"\.(\d+)\.", name):
            return int(match.group(1)) + 1
        return n_layers + 1

    return layer_id


BERT_RULES = """\
all depth last
layer bert.embeddings depth 0
layer bert.encoder.layer.{i} depth i + 1
lr_decay 0.75
"""
# transformers 5 names ViT's blocks vit.layers.N (4.x: vit.encoder.layer.N).
VIT_RULES = """\
all depth last
layer vit.embeddings depth 0
layer vit.layers.{i} depth i + 1
lr_decay 0.75
"""


@pytest.mark.parametrize("frozen", [None, 0, 2])
def test_bert_scales_are_timms(frozen: int | None) -> None:
    model = hf_bert()
    if frozen is not None:  # a frozen block moves no one's scale
        model.bert.encoder.layer[frozen].requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    expected = timm_scales(names, hf_layer_id("bert.embeddings", "bert.encoder.layer", 3))
    assert expected["classifier.weight"] == 1.0 and expected["bert.embeddings.word_embeddings.weight"] == D**4
    assert_same_scales(model, BERT_RULES, expected)


@pytest.mark.parametrize("frozen", [None, 1])
def test_hf_vit_scales_are_timms(frozen: int | None) -> None:
    model = hf_vit()
    if frozen is not None:
        model.vit.layers[frozen].requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    expected = timm_scales(names, hf_layer_id("vit.embeddings", "vit.layers", 3))
    assert expected["vit.embeddings.cls_token"] == D**4 and expected["vit.layers.2.mlp.fc1.weight"] == D
    assert_same_scales(model, VIT_RULES, expected)


def test_freezing_the_deepest_parameters_moves_no_scale() -> None:
    """The head holds the deepest depth; frozen, it still decides it (timm #2691)."""
    model = hf_bert()
    before = regdsl_scales(regdsl.parse(BERT_RULES).compile(model))
    model.classifier.requires_grad_(False)
    model.bert.pooler.requires_grad_(False)
    after = regdsl_scales(regdsl.parse(BERT_RULES).compile(model))
    assert after and all(after[k] == before[k] for k in after)
    assert min(after.values()) == D**4


# ---------------------------------------------------------------- what a depth rule means, on a plain model


class Stages(nn.Module):
    """ConvNeXt's layout: stem, stages.S.downsample, stages.S.blocks.B, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 2)
        self.stages = nn.ModuleList(
            nn.ModuleDict({"downsample": nn.Linear(4, 4), "blocks": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))})
            for _ in range(3)
        )
        self.head = nn.Linear(4, 2)


def test_stage_wise_depth() -> None:
    model = Stages()
    rules = "layer stem depth 0\nlayer stages.{s} depth s + 1\nlayer head depth last\nlr_decay 0.5\n"

    def layer_id(name: str) -> int:  # by stage, whatever the block
        if name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            return int(name.split(".")[1]) + 1
        return 4

    expected = timm_scales([n for n, _ in model.named_parameters()], layer_id, 0.5)
    assert expected["stages.0.blocks.1.weight"] == 0.125 and expected["stages.2.downsample.bias"] == 0.5
    assert_same_scales(model, rules, expected)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        self.reg_token = nn.Parameter(torch.zeros(2, 4))
        self.pos_embed = nn.Parameter(torch.zeros(5, 4))
        self.blocks = nn.Sequential(*(nn.Linear(4, 4) for _ in range(2)))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_tokens_at_depth_0_in_one_line_and_lr_mult_multiplies() -> None:
    model = Tokens()
    rules = """\
layer cls_token, reg_token, pos_embed depth 0
layer blocks.{i} depth i + 1
layer norm depth last
layer head depth last + 1 lr_mult 10
lr_decay 0.5
"""
    reg = regdsl.parse(rules).compile(model)
    got = {n: reg.explain()[k].lr_factor for k, (n, _) in enumerate(model.named_parameters())}
    # deepest = 4 (head: last + 1 = 3 + 1); head's lr_mult multiplies its factor 1.
    assert got == {
        "cls_token": 0.0625, "reg_token": 0.0625, "pos_embed": 0.0625,
        "blocks.0.weight": 0.125, "blocks.0.bias": 0.125, "blocks.1.weight": 0.25, "blocks.1.bias": 0.25,
        "norm.weight": 0.5, "norm.bias": 0.5, "head.weight": 10.0, "head.bias": 10.0,
    }  # fmt: skip
    groups = reg.param_groups(lr=1.0)
    # One group per distinct factor (and decay): tokens, block 0, block 1, norm, head.
    assert [g["lr"] for g in groups] == [0.0625, 0.125, 0.25, 0.5, 10.0]
    assert [len(g["params"]) for g in groups] == [3, 2, 2, 2, 2]


def test_the_last_matching_rule_sets_the_depth_and_exclude_none_leave_it() -> None:
    model = Tokens()
    rules = "all depth 0\nlayer head depth 2\nexclude layer head\nlayer head none\nlr_decay 0.5\n"
    rows = {r.name: r for r in regdsl.resolve(regdsl.parse(rules), model).rows}
    assert rows["head.weight"].depth == 2 and rows["head.weight"].lr_factor == 1.0
    assert rows["cls_token"].depth == 0 and rows["cls_token"].lr_factor == 0.25


def test_a_capture_binds_the_leftmost_component_a_pattern_allows() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
    rows = regdsl.resolve(regdsl.parse("layer **.{i}.** depth i\nlr_decay 0.5\n"), model).rows
    # '0.1.weight' could bind 0 or 1: the leftmost, 0.
    assert {r.name: r.depth for r in rows} == {
        "0.0.weight": 0, "0.0.bias": 0, "0.1.weight": 0, "0.1.bias": 0, "1.0.weight": 1, "1.0.bias": 1,
    }  # fmt: skip


def test_a_parameter_without_a_depth_counts_as_the_deepest_and_warns() -> None:
    model = Tokens()
    rules = "layer cls_token, reg_token, pos_embed depth 0\nlayer blocks.{i} depth i + 1\nlr_decay 0.5\n"
    diagnostics = regdsl.check(regdsl.parse(rules, "r.reg"), model)
    assert [(d.code, d.line) for d in diagnostics] == [("RD206", 3)] * 4
    rows = {r.name: r for r in regdsl.resolve(regdsl.parse(rules), model).rows}
    assert rows["head.bias"].depth == 2 and rows["head.bias"].lr_factor == 1.0
    assert rows["cls_token"].lr_factor == 0.25


def test_a_negative_depth_is_a_compile_error_at_the_term() -> None:
    text = "all depth 3\nlayer blocks.{i} depth i - 1\nlr_decay 0.5\n"
    with pytest.raises(RegCompileError) as info:
        regdsl.parse(text).compile(Tokens())
    (d,) = info.value.diagnostics
    assert (d.code, d.line, d.column) == ("RD108", 2, 18)
    assert "'blocks.0.weight' (-1), 'blocks.0.bias' (-1)" in d.message


@pytest.mark.parametrize("offset", ["", " - 2"])
@pytest.mark.parametrize("digits", [19, 20, 400, 4301])
def test_a_captured_depth_above_2_63_is_a_compile_error_at_the_term(digits: int, offset: str) -> None:
    # A module named by 4,301 digits: int() refused the capture (a raw ValueError); by 400, the factor
    # overflowed (OverflowError); by 20, the layer got lr factor 0.0, silently. 9 * 19 is past 2**63 - 1,
    # and an offset does not bring a capture past it back.
    model = nn.Module()
    model.add_module("5", nn.Linear(2, 2))
    model.add_module("9" * digits, nn.Linear(2, 2))
    model.add_module("head", nn.Linear(2, 2))
    spec = regdsl.parse(f"layer {{i}} depth i{offset}\nlayer head depth last\nlr_decay 0.5\n")
    (found,) = regdsl.check(spec, model)  # 'head' is deepest + 1 of the depths in range: no second error
    with pytest.raises(RegCompileError) as info:
        spec.compile(model)
    (d,) = info.value.diagnostics
    assert (d.code, d.line, d.column) == (found.code, found.line, found.column) == ("RD108", 1, 11)
    assert "this depth is above 2**63 - 1 for '" in d.message and len(d.message) < 500


@pytest.mark.parametrize(
    ("text", "code", "line", "column"),
    [
        ("layer blocks.{i} l2 1", "RD012", 1, 7),
        ("exclude layer blocks.{i}", "RD012", 1, 15),
        ("lr_decay 0.5\nlayer a, blocks.{i} depth i", "RD012", 2, 7),
        ("lr_decay 0.5\nall depth i", "RD012", 2, 11),
        ("lr_decay 0.5\ntype Linear, {i} depth i", "RD012", 2, 14),
        ("lr_decay 0.5\nlayer a.{i} layer b.{i} depth i", "RD012", 2, 13),
        ("lr_decay 0.5\nlayer a.{i}.{i} depth i", "RD005", 2, 7),
        ("lr_decay 0.5\nlayer a.x{i} depth 1", "RD005", 2, 7),
        ("lr_decay 0.5\nall depth 2.5", "RD013", 2, 11),
        ("lr_decay 0.5\nlayer a.{i} depth i - 0.5", "RD013", 2, 23),
        ("all depth 1", "RD013", 1, 5),
        ("all l2 1\n lr_decay 0.5", "RD013", 2, 2),
        ("lr_decay 0\nall depth 1", "RD013", 1, 10),
        ("lr_decay 0.5\nall depth 1\nlr_decay 0.5", "RD013", 3, 1),
    ],
)
def test_errors_are_positioned(text: str, code: str, line: int, column: int) -> None:
    with pytest.raises(RegValidationError) as info:
        regdsl.parse(text)
    assert [(d.code, d.line, d.column) for d in info.value.diagnostics] == [(code, line, column)]


def test_a_literal_brace_is_a_class() -> None:
    model = nn.Module()
    model.add_module("a{b", nn.Linear(2, 2))
    spec = regdsl.parse('layer "a[{]b" l2 1')
    assert [r.name for r in regdsl.resolve(spec, model).rows if r.terms] == ["a{b.weight", "a{b.bias"]


# ---------------------------------------------------------------- explain


def test_explain_shows_depth_and_factor_per_parameter() -> None:
    model = Tokens()
    model.blocks[0].requires_grad_(False)
    rules = "all depth last\nlayer cls_token, reg_token, pos_embed depth 0\nlayer blocks.{i} depth i + 1\nlr_decay 0.5\n"
    rows = regdsl.resolve(regdsl.parse(rules), model).rows
    text = regdsl.format_explain(rows)
    header = text.splitlines()[0].split()
    assert header[-5:] == ["depth", "lr_factor", "set", "by", "(line)"]
    cells = {line.split()[0]: line.split() for line in text.splitlines()[2:]}
    assert cells["cls_token"][-3:] == ["0", "0.125", "depth:2"]
    assert cells["blocks.0.weight"][-3:] == ["1", "0.25", "frozen"]  # frozen, and still at its depth
    assert cells["head.bias"][-3:] == ["3", "1", "depth:1"]
    records = regdsl.report.explain_records(rows)["parameters"]
    assert {r["name"]: (r["depth"], r["lr_factor"]) for r in records}["blocks.1.bias"] == (2, 0.5)
    csv_lines = regdsl.report.explain_csv(rows).splitlines()
    header = csv_lines[0].split(",")
    assert header.count("depth") == 1 and header[header.index("depth") + 1 : header.index("depth") + 3] == ["depth_line", "lr_factor"]
    frozen = dict(zip(header, next(line for line in csv_lines if line.startswith("blocks.0.weight,")).split(",")))
    assert (frozen["name"], frozen["depth"], frozen["depth_line"], frozen["lr_factor"]) == ("blocks.0.weight", "1", "", "0.25")
    plain = regdsl.report.explain_records(regdsl.resolve(regdsl.parse("all l2 1"), model).rows)["parameters"]
    assert "depth" not in plain[0]  # files without lr_decay keep their records as they were


# ---------------------------------------------------------------- training under torch's LR schedulers


def test_lambda_lr_keeps_the_scales_through_steps() -> None:
    model = Tokens()
    rules = "all depth last\nlayer blocks.{i} depth i\nlr_decay 0.5\n"  # blocks 0, 1; the rest: last = 2
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    factor = {"blocks.0.weight": 0.25, "blocks.1.weight": 0.5, "head.weight": 1.0, "cls_token": 1.0}
    params = dict(model.named_parameters())
    for step in range(3):
        before = {n: params[n].detach().clone() for n in factor}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        for name, f in factor.items():
            lr = 0.4 * 0.5**step * f  # the scheduled base lr times the parameter's factor
            torch.testing.assert_close(params[name].detach(), before[name] - lr, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- the docs' examples


def test_every_depth_example_in_the_docs_parses() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    blocks = []
    for doc in ("README.md", "docs/language.md", "docs/integrations/timm.md"):
        body: list[str] | None = None
        for line in (root / doc).read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("```"):  # fences open and close in turn
                if body is not None and any("lr_decay" in b for b in body):
                    blocks.append((doc, "\n".join(body)))
                body = [] if body is None else None
            elif body is not None:
                body.append(line.strip())
    assert len(blocks) >= 5
    for doc, body in blocks:
        spec = regdsl.parse(body, doc)
        assert spec.lr_decay is not None, (doc, body)
