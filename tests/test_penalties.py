"""reg.penalty(): values and gradients against a plain per-parameter loop.

Each case states, next to its rule text, what every parameter must get, derived
by hand from the rules (never read back from regdsl). The reference then loops
over ``model.named_parameters()`` -- which lists a tied tensor once -- and sums
``λ/2·Σw²`` and ``λ·Σ|w|`` in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from models import CNN, MLP, TinyTransformer, randomize
from torch import nn

import regdsl

Terms = dict[str, float]


def reference_penalty(model: nn.Module, terms_for: Callable[[str], Terms]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        terms = terms_for(name)
        w = p.detach().to(torch.float64)
        total += terms.get("l2", 0.0) / 2 * (w * w).sum() + terms.get("l1", 0.0) * w.abs().sum()
    return total


def reference_grad(name: str, p: torch.Tensor, terms_for: Callable[[str], Terms]) -> torch.Tensor:
    # d/dw [λ2/2·w² + λ1·|w|] = λ2·w + λ1·sign(w), with sign(0) = 0.
    terms = terms_for(name)
    w = p.detach().to(torch.float64)
    return terms.get("l2", 0.0) * w + terms.get("l1", 0.0) * torch.sign(w)


def check_penalty(model: nn.Module, rules: str, terms_for: Callable[[str], Terms], rtol: float) -> None:
    reg = regdsl.parse(rules).compile(model)
    penalty = reg.penalty()
    dtypes = {p.dtype for p in model.parameters()}
    assert penalty.shape == ()
    assert penalty.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    torch.testing.assert_close(penalty.double(), reference_penalty(model, terms_for), rtol=rtol, atol=0.0)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(penalty, [p for _, p in named], allow_unused=True)
    for (name, p), grad in zip(named, grads, strict=True):
        expected = reference_grad(name, p, terms_for)
        got = torch.zeros_like(expected) if grad is None else grad.double()
        torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * 1e-3, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- cases: (model, rules, hand-derived terms)


def _mlp_cascade(name: str) -> Terms:
    if name.startswith("fc1."):
        return {"l2": 0.1}
    if name.startswith("fc2."):
        return {"l2": 0.5, "l1": 0.01}
    if name == "head.weight":
        return {"l2": 0.1, "l1": 0.2}
    return {}  # head.bias: `none` clears both the l2 from line 1 and the l1 from line 3


def _mlp_exclude_first(name: str) -> Terms:
    if name.endswith(".bias"):
        return {}  # the exclude on line 1 wins over both later rules
    if name == "fc1.weight":
        return {"l1": 0.05, "l2": 2.0}
    return {"l1": 0.05}


def _mlp_none_reapply(name: str) -> Terms:
    if name.startswith("fc1."):
        return {"l1": 0.3}  # `none` then l1 in the same rule: the l1 after `none` survives
    if name == "fc2.weight":
        return {}
    if name == "fc2.bias":
        return {"l2": 0.25}
    return {"l2": 1.0, "l1": 1.0}


def _mlp_zero_override(name: str) -> Terms:
    if name.startswith("fc1."):
        return {"l1": 0.1}  # `l2 0` overrides the earlier l2 0.3
    return {"l2": 0.3, "l1": 0.1}


def _cnn(name: str) -> Terms:
    if name.startswith(("conv1.", "conv2.")):
        return {"l2": 0.01, "l1": 0.001}
    if name.startswith("bn"):
        return {}  # `norm l2 0` zeroes the l2 from line 1
    if name == "head.weight":
        return {"l2": 0.01}
    return {}  # head.bias excluded


def _transformer(name: str) -> Terms:
    if name == "embed.weight":
        # Tied to lm_head.weight: line 4 reaches it through the alias and overrides line 1.
        return {"l2": 0.5, "l1": 0.001}
    parts = name.split(".")
    if "ln1" in parts or "ln2" in parts or parts[0] == "ln_f":
        return {}  # LayerNorm and the custom RMSNorm are both `norm`
    # blocks.1.attn.out_proj is a Linear subclass: `type Linear` reaches it through its base class.
    if name.startswith(("blocks.1.mlp.", "blocks.1.attn.out_proj.")):
        return {"l2": 0.01, "l1": 0.02}
    return {"l2": 0.01}


CASES = [
    pytest.param(MLP, "all l2 0.1\n", lambda n: {"l2": 0.1}, id="mlp-all-l2"),
    pytest.param(
        MLP,
        "all l2 0.1\nlayer fc2 l2 0.5 l1 0.01\nlayer head.** l1 0.2\nlayer head.bias none\n",
        _mlp_cascade,
        id="mlp-cascade",
    ),
    pytest.param(MLP, "exclude bias\nall l1 0.05\nlayer fc1.weight l2 2\n", _mlp_exclude_first, id="mlp-exclude-first"),
    pytest.param(
        MLP,
        "all l2 1 l1 1\nlayer fc1 none l1 0.3\nlayer fc2.* none\nlayer fc2.bias l2 0.25\n",
        _mlp_none_reapply,
        id="mlp-none",
    ),
    pytest.param(MLP, "all l2 0.3 l1 0.1; layer fc1.* l2 0\n", _mlp_zero_override, id="mlp-zero-override"),
    pytest.param(
        CNN, "all l2 0.01\nnorm l2 0\ntype Conv2d l1 0.001\nexclude layer head.bias\n", _cnn, id="cnn"
    ),
    pytest.param(
        TinyTransformer,
        "all l2 0.01\n"
        "embedding l1 0.001\n"
        "exclude norm\n"
        "layer lm_head l2 0.5\n"
        "layer blocks.1.** type Linear l1 0.02\n",
        _transformer,
        id="transformer",
    ),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("factory", "rules", "terms_for"), CASES)
def test_penalty_and_gradient_match_a_plain_loop(factory, rules: str, terms_for, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = randomize(factory().to(dtype))
    with torch.no_grad():
        # A few exact zeros: the l1 gradient there must be 0, not NaN or ±λ.
        next(iter(model.parameters())).view(-1)[:3] = 0.0
    check_penalty(model, rules, terms_for, rtol=1e-12 if dtype == torch.float64 else 2e-5)


def test_frozen_parameters_are_not_penalized() -> None:
    model = randomize(MLP().double())
    model.fc2.requires_grad_(False)
    check_penalty(model, "all l2 0.5 l1 0.25\n", lambda n: {"l2": 0.5, "l1": 0.25}, rtol=1e-12)
    # The reference skips frozen tensors; make sure that skip mattered.
    assert reference_penalty(model, lambda n: {"l2": 0.5}) < 0.5 / 2 * sum(
        (p.double() ** 2).sum() for p in model.parameters()
    )


# ---------------------------------------------------------------- tied weights


def test_tied_weight_is_penalized_once() -> None:
    model = randomize(TinyTransformer().double())
    w = model.embed.weight.detach()
    reg = regdsl.parse("layer embed l2 1\nlayer lm_head l2 1\n").compile(model)
    once = 0.5 * (w * w).sum()
    # One tensor, two names, two matching rules: still λ/2·Σw² once, not twice.
    torch.testing.assert_close(reg.penalty(), once, rtol=1e-12, atol=0.0)
    (grad,) = torch.autograd.grad(reg.penalty(), [model.embed.weight])
    torch.testing.assert_close(grad, w, rtol=1e-12, atol=0.0)


def test_tied_weight_takes_the_last_rule_through_either_alias() -> None:
    model = randomize(TinyTransformer().double())
    w = model.embed.weight.detach()
    # Line 2 names the second alias and sets the same kind: it replaces line 1, it does not add to it.
    reg = regdsl.parse("layer embed l1 1\nlayer lm_head.weight l1 2\n").compile(model)
    torch.testing.assert_close(reg.penalty(), 2 * w.abs().sum(), rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------- precision


class _Params(nn.Module):
    """A bag of loose parameters, named a, b, c... in the order given."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        for name, t in zip("abcdefgh", tensors, strict=False):
            self.register_parameter(name, nn.Parameter(t))


def test_half_precision_penalty_is_float32_where_a_half_sum_overflows() -> None:
    model = _Params(torch.full((1000,), 100.0, dtype=torch.float16))
    # The naive fp16 sum is inf (1e7 > 65504): the point of accumulating in float32.
    assert torch.isinf((model.a * model.a).sum())
    reg = regdsl.parse("all l2 1\n").compile(model)
    penalty = reg.penalty()
    assert penalty.dtype == torch.float32
    assert torch.isfinite(penalty)
    torch.testing.assert_close(penalty, torch.tensor(0.5 * 1000 * 100.0**2), rtol=1e-6, atol=0.0)
    penalty.backward()
    assert model.a.grad.dtype == torch.float16
    torch.testing.assert_close(model.a.grad, model.a.detach())


def test_bfloat16_penalty_is_accumulated_in_float32() -> None:
    # 1001 is not representable in bfloat16 (8-bit mantissa): a bf16 sum would give 1000 or 1004.
    model = _Params(torch.ones(1001, dtype=torch.bfloat16))
    penalty = regdsl.parse("all l1 1\n").compile(model).penalty()
    assert penalty.dtype == torch.float32
    assert penalty.item() == 1001.0


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((torch.float16, torch.float32), torch.float32),
        ((torch.bfloat16, torch.float16), torch.float32),
        ((torch.float32, torch.float64), torch.float64),
        ((torch.float16, torch.float64), torch.float64),
    ],
)
def test_mixed_dtypes(dtypes: tuple[torch.dtype, ...], expected: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    model = _Params(*(torch.randn(7, 3, generator=g).to(d) for d in dtypes))
    reg = regdsl.parse("layer a l2 0.5\nlayer b l1 0.25 l2 2\n").compile(model)
    penalty = reg.penalty()
    assert penalty.dtype == expected
    terms = {"a": {"l2": 0.5}, "b": {"l1": 0.25, "l2": 2.0}}
    # Tolerance of the lowest precision involved: the inputs are exact, only the sum rounds.
    torch.testing.assert_close(penalty.double(), reference_penalty(model, terms.__getitem__), rtol=1e-6, atol=0.0)


def test_zero_size_parameter() -> None:
    torch.manual_seed(0)
    model = _Params(torch.empty(0, 4), torch.randn(3, 4))
    reg = regdsl.parse("all l2 1 l1 1\n").compile(model)
    penalty = reg.penalty()
    torch.testing.assert_close(penalty, (0.5 * model.b**2 + model.b.abs()).sum().detach())
    penalty.backward()
    assert model.a.grad is None or model.a.grad.shape == (0, 4)
    # The empty tensor is still a parameter the optimizer must see.
    assert sum(len(g["params"]) for g in reg.param_groups()) == 2


def test_all_zero_tensor_has_zero_l2_gradient_not_nan() -> None:
    # ‖w‖² through a norm has a 0/0 at w = 0; the gradient must still be λ·w = 0.
    model = _Params(torch.zeros(5), torch.ones(2))
    penalty = regdsl.parse("all l2 3 l1 2\n").compile(model).penalty()
    penalty.backward()
    assert penalty.item() == pytest.approx(0.5 * 3 * 2 + 2 * 2)
    assert torch.equal(model.a.grad, torch.zeros(5))
    assert torch.equal(model.b.grad, torch.full((2,), 3.0 + 2.0))


# ---------------------------------------------------------------- no terms, device


@pytest.mark.parametrize("rules", ["", "all decay 0.1\n", "all l2 0\n", "exclude all\nall l2 1\n"])
def test_penalty_without_loss_terms_is_zero_and_adds_to_a_loss(rules: str) -> None:
    torch.manual_seed(0)
    model = MLP()
    penalty = regdsl.parse(rules).compile(model).penalty()
    assert penalty.shape == () and penalty.dtype == torch.float32 and penalty.device == torch.device("cpu")
    assert penalty.item() == 0.0
    x = torch.randn(4, 6)
    (model(x).sum() + penalty).backward()
    plain = MLP()
    plain.load_state_dict(model.state_dict())
    plain(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_penalty_with_only_frozen_targets_is_zero() -> None:
    model = MLP()
    model.fc1.requires_grad_(False)
    assert regdsl.parse("layer fc1 l2 1 l1 1\n").compile(model).penalty().item() == 0.0


@pytest.mark.parametrize(
    ("rules", "expected"),
    [("", torch.float32), ("layer a l2 1\n", torch.float32), ("layer b l2 1\n", torch.float64), ("all l1 1\n", torch.float64)],
    ids=["no-terms", "terms-on-float32-only", "terms-on-float64", "terms-on-both"],
)
def test_penalty_dtype_follows_the_penalized_parameters(rules: str, expected: torch.dtype) -> None:
    # The contract (docs/language.md): float32, or float64 as soon as a penalized parameter
    # is float64. Adding a float32 0-dim penalty to a float64 loss promotes to float64 anyway.
    model = _Params(torch.ones(3, dtype=torch.float32), torch.ones(3, dtype=torch.float64))
    penalty = regdsl.parse(rules).compile(model).penalty()
    assert penalty.dtype == expected


def test_penalty_lives_on_the_parameters_device() -> None:
    # The meta device stands in for an accelerator on a CPU-only machine: it has no data,
    # but a result computed on (or copied to) the CPU would show up as a cpu tensor.
    model = MLP().to("meta")
    for rules in ("all l2 1 l1 1\n", "all decay 1\n"):
        penalty = regdsl.parse(rules).compile(model).penalty()
        assert penalty.device.type == "meta", rules
        assert penalty.shape == ()


def test_penalty_follows_a_dtype_change_after_compile() -> None:
    # The groups hold the Parameter objects, which .double()/.to() convert in place, so
    # they keep working after the model moves; the penalty must too.
    torch.manual_seed(0)
    model = MLP()
    reg = regdsl.parse("all l2 0.5\n").compile(model)
    model.double()
    penalty = reg.penalty()
    assert penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, reference_penalty(model, lambda n: {"l2": 0.5}), rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------- decay vs l2 under SGD


@pytest.mark.parametrize(
    "sgd", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "dampening": 0.3}],
    ids=["plain", "momentum", "nesterov", "dampening"],
)
def test_decay_under_sgd_is_the_l2_penalty(sgd: dict) -> None:
    # SGD's weight_decay adds λ·w to the gradient; the l2 term's gradient is λ·w: the two
    # runs must follow the same trajectory, step after step.
    torch.manual_seed(0)
    a = MLP().double()
    b = MLP().double()
    b.load_state_dict(a.state_dict())
    reg_a = regdsl.parse("all decay 0.1\nlayer head.** decay 0.5\nexclude bias\n").compile(a)
    reg_b = regdsl.parse("all l2 0.1\nlayer head.** l2 0.5\nexclude bias\n").compile(b)
    opt_a = torch.optim.SGD(reg_a.param_groups(lr=0.05, **sgd))
    opt_b = torch.optim.SGD(reg_b.param_groups(lr=0.05, **sgd))
    assert reg_a.penalty().item() == 0.0
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randn(8, 3, generator=g, dtype=torch.float64)
        for model, reg, opt in ((a, reg_a, opt_a), (b, reg_b, opt_b)):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() + reg.penalty()
            loss.backward()
            opt.step()
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
    # The runs must have moved, or equal trajectories would prove nothing.
    fresh = MLP().double()
    assert not torch.equal(a.head.weight, fresh.head.weight)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalty_on_cuda_mixed_half_and_float() -> None:
    g = torch.Generator().manual_seed(0)
    model = _Params(
        torch.randn(64, 32, generator=g).half(),
        torch.randn(32, generator=g),
        torch.full((1000,), 100.0).half(),  # Σw² overflows in fp16
    ).cuda()
    reg = regdsl.parse("layer a l2 0.5 l1 0.1\nlayer b l1 2\nlayer c l2 1\n").compile(model)
    penalty = reg.penalty()
    assert penalty.device.type == "cuda"
    assert penalty.dtype == torch.float32
    assert torch.isfinite(penalty)
    terms = {"a": {"l2": 0.5, "l1": 0.1}, "b": {"l1": 2.0}, "c": {"l2": 1.0}}
    cpu = _Params(*(p.detach().cpu() for p in model.parameters()))
    torch.testing.assert_close(penalty.double().cpu(), reference_penalty(cpu, terms.__getitem__), rtol=1e-5, atol=0.0)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for (name, p), grad in zip(model.named_parameters(), grads, strict=True):
        assert grad.device.type == "cuda" and grad.dtype == p.dtype
        torch.testing.assert_close(
            grad.double().cpu(), reference_grad(name, p.cpu(), terms.__getitem__), rtol=1e-3, atol=1e-3
        )
