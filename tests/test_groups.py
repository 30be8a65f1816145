"""reg.param_groups(): a partition of the trainable tensors that optimizers accept.

Expected groups are written out by hand from the rule text and the model's
structure; `check_partition` checks the invariants every result must keep.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CNN, MLP, RMSNorm, TinyTransformer, randomize, transformer_param_names
from torch import nn

import regdsl

STANDARD = "all decay 0.05\nexclude bias\nexclude norm\nexclude embedding\n"


def first_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> its first name, from torch itself (named_parameters lists a tied tensor once)."""
    return {id(p): n for n, p in model.named_parameters()}


def check_partition(groups: list[dict], model: nn.Module) -> None:
    """Every trainable tensor in exactly one group, frozen ones in none, in registration order."""
    order = [p for p in model.parameters()]  # registration order, tied tensors once
    index = {id(p): i for i, p in enumerate(order)}
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a tensor appears in two groups (or twice in one)"
    assert set(seen) == {id(p) for p in order if p.requires_grad}
    for g in groups:
        positions = [index[id(p)] for p in g["params"]]
        assert positions == sorted(positions), f"group {g['name']} is not in registration order"
        assert g["params"], "an empty group"
    firsts = [index[id(g["params"][0])] for g in groups]
    assert firsts == sorted(firsts), "groups are not ordered by their first member"
    decays = [g["weight_decay"] for g in groups]
    assert len(decays) == len(set(decays)), f"groups with equal settings were not merged: {decays}"
    for g in groups:
        assert isinstance(g["weight_decay"], float)
        assert g["name"] == ("no_decay" if g["weight_decay"] == 0 else f"decay={g['weight_decay']!r}")


def as_names(groups: list[dict], model: nn.Module) -> list[tuple[float, list[str]]]:
    names = first_names(model)
    return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in groups]


# ---------------------------------------------------------------- hand-derived groups


def test_mlp_groups() -> None:
    model = MLP()
    groups = regdsl.parse("all decay 0.05\nexclude bias\n").compile(model).param_groups(lr=0.1)
    check_partition(groups, model)
    assert as_names(groups, model) == [
        (0.05, ["fc1.weight", "fc2.weight", "head.weight"]),
        (0.0, ["fc1.bias", "fc2.bias", "head.bias"]),
    ]
    assert [g["name"] for g in groups] == ["decay=0.05", "no_decay"]
    assert all(g["lr"] == 0.1 for g in groups)


def test_cnn_with_batchnorm_and_a_frozen_layer() -> None:
    model = CNN()
    model.bn1.requires_grad_(False)
    groups = regdsl.parse(STANDARD).compile(model).param_groups()
    check_partition(groups, model)
    assert as_names(groups, model) == [
        (0.05, ["conv1.weight", "conv2.weight", "head.weight"]),
        (0.0, ["conv1.bias", "bn2.weight", "bn2.bias", "head.bias"]),  # bn1 is frozen: in no group
    ]


def test_tiny_transformer_standard_rules() -> None:
    model = TinyTransformer()
    groups = regdsl.parse(STANDARD).compile(model).param_groups()
    check_partition(groups, model)
    decayed = ["pos_embed"]  # a bare Parameter: not bias, not norm, not an Embedding module
    plain = ["embed.weight"]  # tied to lm_head.weight; `embedding` reaches it
    for i in range(2):
        b = f"blocks.{i}"
        decayed += [
            f"{b}.attn.in_proj_weight",
            f"{b}.attn.out_proj.weight",
            f"{b}.mlp.0.weight",
            f"{b}.mlp.2.weight",
        ]
        plain += [
            f"{b}.ln1.weight",
            f"{b}.ln1.bias",
            f"{b}.attn.in_proj_bias",  # a name ending in '_bias' is a bias: `exclude bias` reaches it
            f"{b}.attn.out_proj.bias",
            f"{b}.ln2.weight",  # the custom RMSNorm
            f"{b}.mlp.0.bias",
            f"{b}.mlp.2.bias",
        ]
    plain += ["ln_f.weight", "ln_f.bias"]
    order = transformer_param_names()
    # pos_embed comes first in registration order, so the decayed group comes first.
    assert as_names(groups, model) == [(0.05, sorted(decayed, key=order.index)), (0.0, sorted(plain, key=order.index))]
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(model.lm_head.weight)) == 1


def test_equal_settings_from_different_rules_share_a_group() -> None:
    model = MLP()
    # The 0.2 rule is written first, but fc1 (0.1) comes first in the model.
    rules = "layer fc2 decay 0.2\nlayer fc1, head decay 0.1\n"
    groups = regdsl.parse(rules).compile(model).param_groups()
    check_partition(groups, model)
    assert as_names(groups, model) == [
        (0.1, ["fc1.weight", "fc1.bias", "head.weight", "head.bias"]),
        (0.2, ["fc2.weight", "fc2.bias"]),
    ]
    assert [g["name"] for g in groups] == ["decay=0.1", "decay=0.2"]


def test_decay_zero_and_excluded_share_the_no_decay_group() -> None:
    model = MLP()
    groups = regdsl.parse("all decay 0.1\nlayer fc2 decay 0\nexclude layer head.bias\n").compile(model).param_groups()
    check_partition(groups, model)
    assert as_names(groups, model) == [
        (0.1, ["fc1.weight", "fc1.bias", "head.weight"]),
        (0.0, ["fc2.weight", "fc2.bias", "head.bias"]),
    ]


def test_no_rules_is_one_no_decay_group() -> None:
    model = MLP()
    groups = regdsl.parse("").compile(model).param_groups()
    check_partition(groups, model)
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [("no_decay", 0.0, 6)]


def test_l1_and_l2_do_not_split_groups() -> None:
    # Only weight_decay is an optimizer setting; loss terms must not fragment the groups.
    model = MLP()
    groups = regdsl.parse("all decay 0.1\nlayer fc1 l2 1\nlayer head l1 1\n").compile(model).param_groups()
    assert as_names(groups, model) == [(0.1, [n for n, _ in model.named_parameters()])]


def test_groups_summary_agrees_with_hand_derivation() -> None:
    model = MLP()
    model.fc2.weight.requires_grad_(False)
    summary = regdsl.parse("all decay 0.05\nexclude bias\n").compile(model).groups_summary()
    assert [(s.name, s.weight_decay, s.params, s.numel) for s in summary] == [
        ("decay=0.05", 0.05, ("fc1.weight", "head.weight"), 6 * 16 + 16 * 3),
        ("no_decay", 0.0, ("fc1.bias", "fc2.bias", "head.bias"), 16 + 16 + 3),
    ]


@pytest.mark.parametrize("key", ["weight_decay", "params", "name"])
def test_param_groups_rejects_what_the_rules_set(key: str) -> None:
    reg = regdsl.parse("all decay 0.1\n").compile(MLP())
    with pytest.raises(regdsl.RegUsageError):
        reg.param_groups(**{key: 0.0})
    assert reg.param_groups(lr=1.0)  # still usable afterwards


def test_param_groups_returns_fresh_lists() -> None:
    # An optimizer may keep and mutate the dicts it is given; a second call must not see that.
    reg = regdsl.parse("all decay 0.1\nexclude bias\n").compile(MLP())
    first = reg.param_groups(lr=1.0)
    first[0]["params"].clear()
    first[0]["lr"] = 5.0
    second = reg.param_groups(lr=1.0)
    assert len(second[0]["params"]) == 3 and second[0]["lr"] == 1.0


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_optimizers_accept_the_groups_and_apply_their_decay(opt_cls: type) -> None:
    model = randomize(MLP().double())
    reg = regdsl.parse("all decay 0.5\nexclude bias\n").compile(model)
    opt = opt_cls(reg.param_groups(lr=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert [g["name"] for g in opt.param_groups] == ["decay=0.5", "no_decay"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Zero gradients: the only force left is weight decay, so no_decay tensors must not move
    # and decayed ones must shrink.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, before[name]), name
        else:
            assert p.abs().sum() < before[name].abs().sum(), name
    if opt_cls is not torch.optim.Adam:
        # SGD (coupled) and AdamW (decoupled) both give w·(1 − lr·λ) on a zero gradient.
        torch.testing.assert_close(model.fc1.weight, before["fc1.weight"] * (1 - 0.1 * 0.5))


def test_training_step_on_the_transformer() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    reg = regdsl.parse(STANDARD + "layer lm_head l2 1e-3\n").compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-2))
    ids = torch.randint(0, 50, (2, 8))
    before = model.embed.weight.detach().clone()
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1)) + reg.penalty()
    loss.backward()
    opt.step()
    assert not torch.equal(model.embed.weight, before)


# ---------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def transformers_models():
    pytest.importorskip("transformers")
    from models import bert, gpt2

    return gpt2, bert


CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # per GPT-2 block, in order


def test_gpt2_groups(transformers_models) -> None:
    gpt2, _ = transformers_models
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = regdsl.parse(STANDARD).compile(model).param_groups()
    check_partition(groups, model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert ids.count(id(model.lm_head.weight)) == 1
    decayed = [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in CONV1D_MODULES]
    plain = [n for n, _ in model.named_parameters() if n not in decayed]
    assert plain[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    # wte is the model's first tensor, so the no_decay group comes first.
    assert as_names(groups, model) == [(0.0, plain), (0.05, decayed)]


def _selected(model: nn.Module, selector: str) -> list[str]:
    """First names of the tensors `selector` hits, read from the group that `decay 1` puts them in."""
    groups = regdsl.parse(f"{selector} decay 1\n").compile(model).param_groups()
    names = first_names(model)
    return [names[id(p)] for g in groups if g["weight_decay"] == 1.0 for p in g["params"]]


def test_gpt2_selectors(transformers_models) -> None:
    gpt2, _ = transformers_models
    model = gpt2()
    blocks = [f"transformer.h.{i}" for i in range(2)]
    conv1d = [f"{b}.{m}.{k}" for b in blocks for m in CONV1D_MODULES for k in ("weight", "bias")]
    assert _selected(model, "type Conv1D") == conv1d
    assert _selected(model, "type transformers.pytorch_utils.Conv1D") == conv1d
    norms = [f"{b}.{ln}.{k}" for b in blocks for ln in ("ln_1", "ln_2") for k in ("weight", "bias")]
    assert _selected(model, "norm") == norms + ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    # The head is tied: selecting it by its own name selects the embedding tensor.
    assert _selected(model, "layer lm_head") == ["transformer.wte.weight"]
    assert _selected(model, "embedding") == ["transformer.wte.weight", "transformer.wpe.weight"]


def test_bert_groups_and_selectors(transformers_models) -> None:
    _, bert = transformers_models
    model = bert()
    names = [n for n, _ in model.named_parameters()]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    # BERT's norms are nn.LayerNorm modules that happen to be called LayerNorm.
    assert _selected(model, "norm") == [n for n in names if ".LayerNorm." in n]
    assert _selected(model, "layer **.LayerNorm") == [n for n in names if ".LayerNorm." in n]
    groups = regdsl.parse(STANDARD).compile(model).param_groups()
    check_partition(groups, model)
    decayed = [n for n in names if n.endswith(".weight") and ".LayerNorm." not in n and "embeddings" not in n]
    assert decayed[0] == "bert.encoder.layer.0.attention.self.query.weight"  # the filter above did pick the Linears
    plain = [n for n in names if n not in decayed]
    # cls.predictions.bias is tied to decoder.bias and is a `bias` under both names.
    assert "cls.predictions.bias" in plain
    # word_embeddings is the first tensor, so the no_decay group comes first.
    assert as_names(groups, model) == [(0.0, plain), (0.05, decayed)]


def test_gpt2_trains_with_the_groups(transformers_models) -> None:
    gpt2, _ = transformers_models
    model = gpt2()
    reg = regdsl.parse(STANDARD + "type Conv1D l2 1e-4\n").compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-3))
    ids = torch.randint(0, 100, (2, 8))
    out = model(input_ids=ids, labels=ids)
    (out.loss + reg.penalty()).backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, before)


# ---------------------------------------------------------------- property: random rule files


def _tensors(model: nn.Module) -> list[tuple[nn.Parameter, tuple[str, ...], tuple[nn.Module, ...]]]:
    """(tensor, all its names, the module owning it under each name), in registration order."""
    found: dict[int, tuple[nn.Parameter, list[str], list[nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is None:
                continue
            entry = found.setdefault(id(p), (p, [], []))
            entry[1].append(f"{module_name}.{pname}" if module_name else pname)
            entry[2].append(module)
    return [(p, tuple(n), tuple(o)) for p, n, o in found.values()]


def _prefix_of(prefix: str):
    return lambda names, owners: any(n.startswith(prefix) for n in names)


# Each selector atom of the vocabulary, with what it means on TinyTransformer, written plainly.
ATOMS = {
    "all": lambda names, owners: True,
    "bias": lambda names, owners: any(n.split(".")[-1] == "bias" or n.endswith("_bias") for n in names),
    "norm": lambda names, owners: any(isinstance(o, (nn.LayerNorm, RMSNorm)) for o in owners),
    "embedding": lambda names, owners: any(isinstance(o, nn.Embedding) for o in owners),
    "layer blocks.0.**": _prefix_of("blocks.0."),
    "layer lm_head": _prefix_of("lm_head."),
    "layer **.weight": lambda names, owners: any(n.split(".")[-1] == "weight" for n in names),
    "layer blocks.*.mlp.*": lambda names, owners: any(
        len(n.split(".")) >= 4 and n.split(".")[0] == "blocks" and n.split(".")[2] == "mlp" for n in names
    ),
    "layer pos_embed, ln_f": lambda names, owners: any(n == "pos_embed" or n.startswith("ln_f.") for n in names),
    "type Linear": lambda names, owners: any(isinstance(o, nn.Linear) for o in owners),  # subclasses too
    "type LayerNorm, RMSNorm": lambda names, owners: any(type(o) in (nn.LayerNorm, RMSNorm) for o in owners),
}

strengths = st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5])
term = st.one_of(
    st.tuples(st.sampled_from(["decay", "l1", "l2"]), strengths),
    st.just(("none", None)),
)
terms = st.lists(term, min_size=1, max_size=4, unique_by=lambda t: t[0])
selector = st.lists(st.sampled_from(sorted(ATOMS)), min_size=1, max_size=2)
statement = st.one_of(
    st.tuples(st.just("rule"), selector, terms),
    st.tuples(st.just("exclude"), selector, st.just([])),
)
rule_files = st.lists(statement, min_size=0, max_size=6)


def _text(statements, separator: str) -> str:
    lines = []
    for kind, atoms, ts in statements:
        sel = " ".join(atoms)
        if kind == "exclude":
            lines.append(f"exclude {sel}")
        else:
            lines.append(sel + " " + " ".join(k if v is None else f"{k} {v!r}" for k, v in ts))
    return separator.join(lines)


def _reference(statements, names, owners) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, atoms, ts in statements:
        if not all(ATOMS[a](names, owners) for a in atoms):
            continue
        if kind == "exclude":
            return {}  # an exclude anywhere in the file removes everything
        for k, v in ts:
            if k == "none":
                out.clear()
            else:
                out[k] = v
    return out


_MODEL = None


def _property_model() -> TinyTransformer:
    global _MODEL
    if _MODEL is None:
        torch.manual_seed(0)
        _MODEL = randomize(TinyTransformer().double())
        _MODEL.pos_embed.requires_grad_(False)
        _MODEL.blocks[1].ln1.requires_grad_(False)
    return _MODEL


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(statements=rule_files, separator=st.sampled_from(["\n", "; "]))
def test_random_rule_files_match_a_plain_cascade(statements, separator: str) -> None:
    model = _property_model()
    spec = regdsl.parse(_text(statements, separator))
    errors = [d for d in regdsl.check(spec, model) if d.severity == "error"]
    if errors:
        # A file check rejects (a selector that matches nothing) compiles to nothing at all.
        with pytest.raises(regdsl.RegCompileError) as info:
            spec.compile(model)
        assert info.value.diagnostics == errors
        return
    reg = spec.compile(model)
    groups = reg.param_groups()
    check_partition(groups, model)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    expected_penalty = torch.zeros((), dtype=torch.float64)
    for p, names, owners in _tensors(model):
        if not p.requires_grad:
            assert id(p) not in decay_of
            continue
        ref = _reference(statements, names, owners)
        assert decay_of[id(p)] == ref.get("decay", 0.0), (names, ref)
        w = p.detach()
        expected_penalty += ref.get("l2", 0.0) / 2 * (w * w).sum() + ref.get("l1", 0.0) * w.abs().sum()
    # Values only: the penalty's dtype has its own test in test_penalties.py.
    torch.testing.assert_close(reg.penalty().detach().double(), expected_penalty, rtol=1e-10, atol=1e-12)


def test_lr_scale_instead_of_a_scaled_lr() -> None:
    """param_groups(lr_scale=True), for timm's schedulers: the multiplier as lr_scale, the base lr
    kept; never both (a timm scheduler would then scale twice)."""
    from models import MLP

    model = MLP()
    reg = regdsl.compile(regdsl.parse("all decay 0.1\nlayer head.** lr_mult 0.25"), model)
    scaled = reg.param_groups(lr_scale=True, lr=0.4)
    head = [g for g in scaled if any(p is model.head.weight for p in g["params"])]
    rest = [g for g in scaled if g not in head]
    assert head and all(g["lr_scale"] == 0.25 and g["lr"] == 0.4 for g in head)
    assert rest and all("lr_scale" not in g and g["lr"] == 0.4 for g in rest)
    plain = reg.param_groups(lr=0.4)
    assert not any("lr_scale" in g for g in plain)
    assert [g["lr"] for g in plain if any(p is model.head.weight for p in g["params"])] == [0.1]
    with pytest.raises(regdsl.RegUsageError, match=r"lr_scale=True\) for timm"):
        reg.param_groups()
    assert reg.param_groups(lr_scale=True)[0].get("lr") is None  # no lr needed: timm's scheduler sets it


@pytest.mark.parametrize(
    ("build", "wrong"),
    [
        # torch's AdamW decays every tensor by 0.01: the excluded bias and norm too, the weights by the wrong value.
        (lambda m, reg: torch.optim.AdamW(m.parameters(), lr=1e-3), 6),
        (lambda m, reg: torch.optim.SGD(m.parameters(), lr=0.1), 2),  # no decay at all: the file's 0.1 does nothing
        (lambda m, reg: torch.optim.AdamW(reg.param_groups(lr=1e-3)), 0),
    ],
    ids=["AdamW(model.parameters())", "SGD(model.parameters())", "param_groups"],
)
def test_attach_warns_when_the_optimizers_groups_would_not_apply_the_files_decay(build, wrong: int) -> None:
    # Before, the file's decay was a silent no-op with an optimizer built from model.parameters().
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    reg = regdsl.parse("all decay 0.1\nexclude bias\nexclude norm").compile(model)
    optimizer = build(model, reg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.attach(optimizer)
    said = [str(w.message) for w in caught if "weight_decay is not the rule file's" in str(w.message)]
    if wrong:
        assert len(said) == 1 and f"for {wrong} tensors" in said[0] and "reg.param_groups()" in said[0], said
    else:
        assert said == []


def test_a_file_without_decay_leaves_the_optimizers_decay_alone() -> None:
    model = nn.Linear(3, 2)
    reg = regdsl.parse("all l1 1e-4").compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.attach(torch.optim.AdamW(model.parameters(), lr=1e-3))
