"""Selector semantics, each on a model built so the answer can be read off its structure.

`selected()` compiles "SELECTOR decay 1" and reads back which tensors landed in
the decay=1 group, named by torch's own named_parameters(); the expected lists
are written by hand. A selector that selects nothing is a mistake compile()
refuses, so for those `selected()` asks resolve() (which is not strict) and
checks that compile() raises.
"""

from __future__ import annotations

import pytest
import torch
from models import MLP, MyLayerNorm, RMSNorm, TinyTransformer
from torch import nn

import regdsl
from regdsl import RegCompileError


def names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def selected(model: nn.Module, selector: str, names: dict[int, str] | None = None) -> list[str]:
    names = names or names_by_id(model)
    spec = regdsl.parse(f"{selector} decay 1\n")
    resolution = regdsl.resolve(spec, model)
    matched = [names[id(resolution.table.entries[i].param)] for i in resolution.matches[0]]
    if not matched:
        with pytest.raises(RegCompileError) as raised:
            spec.compile(model)
        assert {d.code for d in raised.value.diagnostics} <= {"RD101", "RD102"}, raised.value
        return []
    groups = spec.compile(model).param_groups()
    decayed = [names[id(p)] for g in groups if g["weight_decay"] == 1.0 for p in g["params"]]
    assert decayed == matched  # compile() applies what resolve() selects
    return decayed


def tree(**children: nn.Module | nn.Parameter) -> nn.Module:
    """A plain module with the given children and parameters, registered in keyword order."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) if shape else torch.randn(()))


def linear() -> nn.Linear:
    return nn.Linear(2, 2)


# ---------------------------------------------------------------- layer globs


def test_star_stays_inside_a_segment() -> None:
    model = tree(fc2=linear(), fc22=linear(), fc=tree(x2=linear()))
    assert selected(model, "layer fc2.*") == ["fc2.weight", "fc2.bias"]
    # A module name selects what it contains; fc22 only shares a prefix.
    assert selected(model, "layer fc2") == ["fc2.weight", "fc2.bias"]
    assert selected(model, "layer fc2*") == ["fc2.weight", "fc2.bias", "fc22.weight", "fc22.bias"]
    assert selected(model, "layer fc2.weight") == ["fc2.weight"]
    # `*` never crosses a dot: fc.x2 is not fc*2.
    assert selected(model, "layer fc*2") == ["fc2.weight", "fc2.bias", "fc22.weight", "fc22.bias"]
    assert selected(model, "layer *.weight") == ["fc2.weight", "fc22.weight"]


def test_globs_are_anchored() -> None:
    model = tree(head=linear(), subhead=linear(), heads=linear())
    assert selected(model, "layer head") == ["head.weight", "head.bias"]
    assert selected(model, "layer eight") == []
    assert selected(model, "layer weight") == []  # full names only: `weight` is not `head.weight`


def _nested() -> nn.Module:
    # a owns a weight itself and has children b and c.b; ab is a sibling sharing a's prefix;
    # `bias` and `scale` are parameters of the root.
    a = tree(weight=param(2), b=linear(), c=tree(b=linear()))
    return tree(bias=param(3), scale=param(), a=a, ab=linear())


def test_double_star_forms() -> None:
    model = _nested()
    everything = [n for n, _ in model.named_parameters()]
    assert everything[:2] == ["bias", "scale"]
    assert selected(model, "layer **") == everything
    assert selected(model, "layer **.bias") == ["bias", "a.b.bias", "a.c.b.bias", "ab.bias"]  # zero segments too
    assert selected(model, "layer a.**.b") == ["a.b.weight", "a.b.bias", "a.c.b.weight", "a.c.b.bias"]
    # `**` in the middle may stand for no segment at all: a.weight.
    assert selected(model, "layer a.**.weight") == ["a.weight", "a.b.weight", "a.c.b.weight"]
    assert selected(model, "layer a.**") == ["a.weight", "a.b.weight", "a.b.bias", "a.c.b.weight", "a.c.b.bias"]
    # `X.**` matches X itself: the root parameter `scale` has no further segment.
    assert selected(model, "layer scale.**") == ["scale"]
    assert selected(model, "layer **.b.**") == ["a.b.weight", "a.b.bias", "a.c.b.weight", "a.c.b.bias"]
    assert selected(model, "layer **.**.bias") == ["bias", "a.b.bias", "a.c.b.bias", "ab.bias"]
    assert selected(model, "layer **.c.**.bias") == ["a.c.b.bias"]


def test_question_mark_and_classes() -> None:
    model = tree(layer1=linear(), layer2=linear(), layer10=linear(), layerx=linear())
    assert selected(model, "layer layer?") == [f"layer{s}.{k}" for s in ("1", "2", "x") for k in ("weight", "bias")]
    assert selected(model, "layer layer??") == ["layer10.weight", "layer10.bias"]
    blocks = tree(blocks=nn.ModuleList(linear() for _ in range(5)))

    def w(*idx: int) -> list[str]:
        return [f"blocks.{i}.{k}" for i in idx for k in ("weight", "bias")]

    assert selected(blocks, "layer blocks.[0-2].**") == w(0, 1, 2)
    assert selected(blocks, "layer blocks.[!0-2]") == w(3, 4)
    assert selected(blocks, "layer blocks.[13].weight") == ["blocks.1.weight", "blocks.3.weight"]
    assert selected(blocks, "layer blocks.[!13].weight") == ["blocks.0.weight", "blocks.2.weight", "blocks.4.weight"]


def test_negated_class_that_starts_with_a_bracket() -> None:
    # As in fnmatch, a ']' right after '[' or '[!' is a member of the class, so `x[!]]` is
    # "x, then one character that is not ']'" (the spec validator accepts this form).
    model = nn.ModuleDict({"xa": linear(), "x]": linear(), "xb": linear()})
    assert selected(model, 'layer "x[!]]"') == ["xa.weight", "xa.bias", "xb.weight", "xb.bias"]
    assert selected(model, 'layer "x[]]"') == ["x].weight", "x].bias"]


def test_layer_globs_are_case_sensitive() -> None:
    model = tree(Head=linear(), head=linear())
    assert selected(model, "layer head") == ["head.weight", "head.bias"]
    assert selected(model, "layer Head") == ["Head.weight", "Head.bias"]
    assert selected(model, "layer HEAD") == []
    assert selected(model, "layer [h]ead") == ["head.weight", "head.bias"]


def test_comma_is_any_of() -> None:
    model = MLP()
    assert selected(model, "layer fc1, head.bias") == ["fc1.weight", "fc1.bias", "head.bias"]


def test_a_module_called_like_a_keyword() -> None:
    model = tree(norm=linear(), ln=nn.LayerNorm(2))
    assert selected(model, "layer norm") == ["norm.weight", "norm.bias"]
    assert selected(model, "norm") == ["ln.weight", "ln.bias"]
    assert selected(model, 'layer "norm"') == ["norm.weight", "norm.bias"]


# ---------------------------------------------------------------- type


class MyLinear(nn.Linear):
    pass


def test_type_matches_the_class_or_a_base_class_by_short_or_qualified_name() -> None:
    model = tree(
        lin=linear(), sub=MyLinear(2, 2), ln=nn.LayerNorm(2), mine=MyLayerNorm(2), bn=nn.BatchNorm1d(2), rms=RMSNorm(2)
    )
    lin, sub = ["lin.weight", "lin.bias"], ["sub.weight", "sub.bias"]
    for spelling in ("Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"):
        # MyLinear is a Linear, as isinstance says.
        assert selected(model, f"type {spelling}") == lin + sub, spelling
    # A subclass's own name selects the subclass only: the walk goes up the bases, never down.
    assert selected(model, "type MyLinear") == sub
    assert selected(model, "type *Linear") == lin + sub
    # BatchNorm1d's own name does not end in "Norm", but its base class _NormBase does.
    bn = ["bn.weight", "bn.bias"]
    assert selected(model, "type *Norm") == ["ln.weight", "ln.bias", "mine.gain", "mine.shift", *bn, "rms.weight"]
    assert selected(model, "type _NormBase") == bn  # LayerNorm is no _NormBase
    assert selected(model, "type torch.nn.LayerNorm") == ["ln.weight", "ln.bias"]
    assert selected(model, "type LayerNorm, BatchNorm1d") == ["ln.weight", "ln.bias", *bn]
    # A glob over the public path: torch.nn's classes, and the test's MyLinear through torch.nn.Linear;
    # the custom norms derive from nn.Module only.
    assert selected(model, "type torch.nn.*") == lin + sub + ["ln.weight", "ln.bias", *bn]
    assert selected(model, "type linear") == []  # case-sensitive
    # nn.Module is where the walk stops: as a base of everything it would make 'type Module' mean 'all'.
    assert selected(model, "type Module") == []


def test_type_sees_the_direct_owner_only() -> None:
    model = tree(block=tree(proj=linear(), scale=param(2)))
    assert selected(model, "type Linear") == ["block.proj.weight", "block.proj.bias"]
    assert selected(model, "type Module") == ["block.scale"]


def test_multihead_attention_out_proj_is_a_linear() -> None:
    # out_proj is a NonDynamicallyQuantizableLinear, a subclass of Linear: 'type Linear' reaches it.
    model = TinyTransformer(n_layers=1)
    out_proj = ["blocks.0.attn.out_proj.weight", "blocks.0.attn.out_proj.bias"]
    assert selected(model, "layer blocks.0.attn.** type Linear") == out_proj
    assert selected(model, "type NonDynamicallyQuantizableLinear") == out_proj
    assert selected(model, "type MultiheadAttention") == ["blocks.0.attn.in_proj_weight", "blocks.0.attn.in_proj_bias"]
    mlp = [f"blocks.0.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")]
    # embed.weight is lm_head.weight (tied), and lm_head is a Linear.
    assert selected(model, "type Linear") == ["embed.weight", *out_proj, *mlp]


# ---------------------------------------------------------------- bias, norm, embedding


def test_bias_is_named_bias_or_ends_in_bias() -> None:
    model = tree(attn=nn.MultiheadAttention(4, 2, add_bias_kv=True), b=tree(bias_scale=param(2), my_bias=param(2)))
    names = [n for n, _ in model.named_parameters()]
    assert {"attn.bias_k", "attn.bias_v", "attn.in_proj_bias"} <= set(names)
    # in_proj_bias is MultiheadAttention's input-projection bias; bias_k and bias_v are learned
    # key/value tokens appended to the sequence, not biases, and bias_scale is not one either.
    assert selected(model, "bias") == ["attn.in_proj_bias", "attn.out_proj.bias", "b.my_bias"]
    # A layer glob means exactly what it says.
    assert selected(model, "layer **.bias") == ["attn.out_proj.bias"]
    assert selected(model, "layer **.bias_*") == ["attn.bias_k", "attn.bias_v", "b.bias_scale"]


class LNWithScale(nn.LayerNorm):
    """A torch.nn norm subclass whose name does not end in Norm: found by what it is."""


class FancyNorm(nn.Module):
    """A norm-named container: its own parameter is a norm parameter, its child Linear's are not."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = param(2)
        self.proj = linear()


class Normalizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = param(2)


def test_norm() -> None:
    model = tree(
        bn=nn.BatchNorm2d(2),
        inorm=nn.InstanceNorm1d(2, affine=True),
        ln=nn.LayerNorm(2),
        gn=nn.GroupNorm(1, 2),
        trms=nn.RMSNorm(2),
        lrn=nn.LocalResponseNorm(2),  # no parameters: must not break anything
        rms=RMSNorm(2),
        mine=MyLayerNorm(2),
        sub=LNWithScale(2),
        fancy=FancyNorm(),
        normalizer=Normalizer(),
        lin=linear(),
    )
    assert selected(model, "norm") == [
        "bn.weight",
        "bn.bias",
        "inorm.weight",
        "inorm.bias",
        "ln.weight",
        "ln.bias",
        "gn.weight",
        "gn.bias",
        "trms.weight",
        "rms.weight",
        "mine.gain",
        "mine.shift",
        "sub.weight",
        "sub.bias",
        "fancy.scale",
    ]


def test_norm_covers_batchnorm_of_every_dimension() -> None:
    model = tree(bn1=nn.BatchNorm1d(3), bn3=nn.BatchNorm3d(3), lin=linear())
    assert selected(model, "norm") == ["bn1.weight", "bn1.bias", "bn3.weight", "bn3.bias"]


def test_embedding() -> None:
    model = tree(emb=nn.Embedding(5, 2, padding_idx=0), bag=nn.EmbeddingBag(5, 2), lin=linear(), table=param(5, 2))
    assert selected(model, "embedding") == ["emb.weight", "bag.weight"]


# ---------------------------------------------------------------- atoms are ANDed


def test_atoms_are_anded() -> None:
    model = tree(
        encoder=nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2)),
        decoder=nn.Linear(2, 2),
    )
    assert selected(model, "layer encoder.** type Linear") == [
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.2.weight",
        "encoder.2.bias",
    ]
    assert selected(model, "layer encoder.** bias") == ["encoder.0.bias", "encoder.1.bias", "encoder.2.bias"]
    assert selected(model, "type Linear bias") == ["encoder.0.bias", "encoder.2.bias", "decoder.bias"]
    assert selected(model, "norm type Linear") == []
    assert selected(model, "all layer decoder") == ["decoder.weight", "decoder.bias"]
    assert selected(model, "layer encoder.0, decoder type Linear bias") == ["encoder.0.bias", "decoder.bias"]


# ---------------------------------------------------------------- tied weights


def _tied(head_first: bool) -> tuple[nn.Module, nn.Parameter]:
    emb, head = nn.Embedding(5, 2), nn.Linear(2, 5)
    head.weight = emb.weight
    model = tree(head=head, emb=emb) if head_first else tree(emb=emb, head=head)
    return model, emb.weight


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_weight_is_matched_through_any_alias(head_first: bool) -> None:
    model, w = _tied(head_first)
    first = "head.weight" if head_first else "emb.weight"
    assert names_by_id(model)[id(w)] == first  # torch lists it under its first registration
    for selector in ("layer head.weight", "layer emb", "embedding", "type Linear", "type Embedding"):
        assert first in selected(model, selector), selector
    assert selected(model, "type Embedding") == [first]
    assert selected(model, "layer head") == [first, "head.bias"]
    # Two rules through the two aliases: the later one wins, one group holds the tensor once.
    groups = regdsl.parse("layer emb decay 0.1\nlayer head decay 0.2\n").compile(model).param_groups()
    holding = [g["weight_decay"] for g in groups for p in g["params"] if p is w]
    assert holding == [0.2]


def test_a_shared_module_is_one_set_of_tensors() -> None:
    shared = linear()
    model = tree(a=shared, b=tree(inner=shared))
    assert selected(model, "layer b.inner") == ["a.weight", "a.bias"]
    groups = regdsl.parse("all decay 0.1\n").compile(model).param_groups()
    assert [len(g["params"]) for g in groups] == [2]


# ---------------------------------------------------------------- wrappers


WRAPPER_RULES = "all decay 0.1\nlayer fc2 decay 0.3\nexclude bias\ntype LayerNorm decay 0\nlayer head.weight l2 1\n"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.ln(self.fc1(x))))


# What WRAPPER_RULES give Net, derived by hand: (weight_decay, first names) per group.
WRAPPER_EXPECTED = [
    (0.1, ["fc1.weight", "head.weight"]),
    (0.0, ["fc1.bias", "ln.weight", "ln.bias", "fc2.bias", "head.bias"]),
    (0.3, ["fc2.weight"]),
]


def wrapped_groups(wrapped: nn.Module, inner: nn.Module) -> tuple[list[tuple[float, list[str]]], list]:
    names = names_by_id(inner)
    reg = regdsl.parse(WRAPPER_RULES).compile(wrapped)
    groups = [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in reg.param_groups()]
    summary = [(s.weight_decay, list(s.params)) for s in reg.groups_summary()]
    return groups, summary


def _assert_same_as_bare(wrapped: nn.Module, inner: nn.Module) -> None:
    groups, summary = wrapped_groups(wrapped, inner)
    assert groups == WRAPPER_EXPECTED
    # The names regdsl reports are the bare model's, with no wrapper prefix.
    assert summary == WRAPPER_EXPECTED
    w = inner.head.weight.detach()
    torch.testing.assert_close(regdsl.parse(WRAPPER_RULES).compile(wrapped).penalty(), 0.5 * (w * w).sum())


def test_bare_model() -> None:
    net = Net()
    _assert_same_as_bare(net, net)


def test_data_parallel() -> None:
    net = Net()
    _assert_same_as_bare(nn.DataParallel(net), net)


def test_averaged_model() -> None:
    from torch.optim.swa_utils import AveragedModel

    avg = AveragedModel(Net())
    # AveragedModel holds a deep copy: name its tensors through the copy.
    _assert_same_as_bare(avg, avg.module)


def test_torch_compile() -> None:
    net = Net()
    _assert_same_as_bare(torch.compile(net), net)


def test_checkpoint_wrapper() -> None:
    cw = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    net = Net()
    names = names_by_id(net)  # before wrapping: the bare names
    net.fc2 = cw.checkpoint_wrapper(net.fc2)
    net.ln = cw.checkpoint_wrapper(net.ln)
    assert "fc2._checkpoint_wrapped_module.weight" in dict(net.named_parameters())
    reg = regdsl.parse(WRAPPER_RULES).compile(net)
    groups = [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in reg.param_groups()]
    assert groups == WRAPPER_EXPECTED
    assert [(s.weight_decay, list(s.params)) for s in reg.groups_summary()] == WRAPPER_EXPECTED


@pytest.mark.parametrize("outer", ["data_parallel", "averaged_model"])
def test_torch_compile_of_a_wrapped_model(outer: str) -> None:
    # Both orders, compile(DDP(model)) and DDP(compile(model)), occur in practice; this one
    # names tensors `_orig_mod.module.fc1.weight`, and both wrapper parts must go.
    from torch.optim.swa_utils import AveragedModel

    net = Net()
    wrapper = nn.DataParallel(net) if outer == "data_parallel" else AveragedModel(net)
    inner = wrapper.module
    _assert_same_as_bare(torch.compile(wrapper), inner)


def test_distributed_data_parallel(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = Net()
        _assert_same_as_bare(nn.parallel.DistributedDataParallel(net), net)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- explain()


EXPLAIN_RULES = """\
all decay 0.1 l2 0.01
# a comment line still counts as a line

layer fc2 l2 0.5
exclude layer head.bias
layer fc1 none
layer fc1.weight l1 0.2; exclude layer fc2.weight
"""


def test_explain_reports_frozen_excluded_and_the_winning_line() -> None:
    model = MLP()
    model.fc2.bias.requires_grad_(False)
    rows = {row.name: row for row in regdsl.parse(EXPLAIN_RULES).compile(model).explain()}
    assert list(rows) == [n for n, _ in model.named_parameters()]

    def terms(name: str) -> dict[str, tuple[float, int]]:
        return {k: (s.value, s.pos.line) for k, s in rows[name].terms.items()}

    assert terms("fc1.weight") == {"l1": (0.2, 7)}  # line 6 cleared lines 1's terms, line 7 set l1
    assert terms("fc1.bias") == {}
    assert rows["fc1.bias"].excluded_by is None
    assert rows["fc2.weight"].excluded_by.pos.line == 7  # the exclude after ';' on line 7
    assert terms("fc2.weight") == {}
    assert terms("head.weight") == {"decay": (0.1, 1), "l2": (0.01, 1)}
    assert rows["head.bias"].excluded_by.pos.line == 5 and terms("head.bias") == {}
    frozen = rows["fc2.bias"]
    assert frozen.trainable is False and frozen.terms == {} and frozen.excluded_by is None
    assert all(rows[n].trainable for n in rows if n != "fc2.bias")
    assert rows["fc1.weight"].shape == (16, 6) and rows["fc1.weight"].numel == 96


def test_explain_names_the_first_matching_exclude() -> None:
    model = MLP()
    rows = {r.name: r for r in regdsl.parse("exclude bias\nall decay 1\nexclude layer head\n").compile(model).explain()}
    assert rows["head.bias"].excluded_by.pos.line == 1
    assert rows["head.weight"].excluded_by.pos.line == 3
    assert rows["fc1.weight"].excluded_by is None and rows["fc1.weight"].terms["decay"].value == 1.0


def test_explain_of_a_cascade_names_each_terms_own_line() -> None:
    model = MLP()
    rows = {r.name: r for r in regdsl.parse(EXPLAIN_RULES).compile(model).explain()}
    # fc2.bias: decay from line 1, l2 overridden on line 4.
    assert {k: (s.value, s.pos.line) for k, s in rows["fc2.bias"].terms.items()} == {
        "decay": (0.1, 1),
        "l2": (0.5, 4),
    }


def test_explain_tied_row_and_file_origin(tmp_path) -> None:
    model, _ = _tied(head_first=False)
    path = tmp_path / "tied.reg"
    path.write_text("embedding l2 1\nlayer head.weight decay 0.2\n", encoding="utf-8")
    rows = regdsl.compile(path, model).explain()
    assert [(r.name, r.aliases) for r in rows] == [("emb.weight", ("head.weight",)), ("head.bias", ())]
    tied = rows[0]
    assert {k: s.value for k, s in tied.terms.items()} == {"l2": 1.0, "decay": 0.2}
    assert tied.terms["decay"].where == f"{path}:2"
    assert tied.terms["l2"].origin == str(path)
