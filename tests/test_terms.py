"""Every term kind through one battery: value and gradient, or the effect of one optimizer step,
against a plain reference formula written here.

``REFERENCES`` says, for each kind of ``regdsl.spec.VALUE_TERMS``, how to exercise it (rule
templates) and what it must do (a plain formula on cloned tensors). The battery runs every kind
x dtype (float32, float64) x weight layout (contiguous, transposed and strided views, conv,
channels_last conv, all-zero slices, zero-size parameters). A kind added to VALUE_TERMS without
an entry here fails ``test_every_kind_has_a_reference``; once it has one, it runs through the
same battery.

No expected value is read back from regdsl: references start from copies of the weights taken
before anything runs, and from gradients the test sets by hand.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import regdsl
from regdsl import penalties
from regdsl.spec import VALUE_TERMS

LR = 0.1
BATCH = 5
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float64, torch.float32]


# ================================================================ models: one per weight layout


def _fill(model: nn.Module, seed: int) -> None:
    """Distinct nonzero values in every parameter; copy_ keeps each parameter's strides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))


class TransposedLinear(nn.Module):
    """weight is a transposed view: shape (6, 4), strides (1, 6) -- tall and non-contiguous."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6, dtype=dtype).t())
        self.bias = nn.Parameter(torch.randn(4, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class StridedLinear(nn.Module):
    """weight is every other column of a (4, 12) tensor: shape (4, 6), strides (12, 2), not dense."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 12, dtype=dtype)[:, ::2])
        self.bias = nn.Parameter(torch.randn(4, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LinearNet(nn.Module):
    def __init__(self, body: nn.Module, width: int = 4):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


class ZeroGroupNet(nn.Module):
    """conv: filter 0 and input channel 1 all zero; lin: row 1 and column 2 zero; dead: all zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.lin = nn.Linear(5, 4)
        self.dead = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def zero(self) -> None:
        with torch.no_grad():
            self.conv.weight[0].zero_()
            self.conv.weight[:, 1].zero_()
            self.lin.weight[1].zero_()
            self.lin.weight[:, 2].zero_()
            self.dead.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(self.dead(torch.tanh(self.lin(h))))


class ZeroSizeNet(nn.Module):
    """empty.weight (0, 4), empty.bias (0,), lin0.weight (3, 0), beside an ordinary lin (2, 4)."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
            self.empty = nn.Linear(4, 0)
            self.lin0 = nn.Linear(0, 3)
        self.lin = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.lin(x), self.lin0(x[:, :0]), self.empty(x)], dim=1)


def _build_linear(dtype: torch.dtype) -> nn.Module:
    return LinearNet(nn.Linear(6, 4)).to(dtype)


def _build_transposed(dtype: torch.dtype) -> nn.Module:
    model = LinearNet(TransposedLinear(dtype))
    model.head.to(dtype)
    assert not model.body.weight.is_contiguous() and model.body.weight.stride() == (1, 6)
    return model


def _build_strided(dtype: torch.dtype) -> nn.Module:
    model = LinearNet(StridedLinear(dtype))
    model.head.to(dtype)
    assert model.body.weight.stride() == (12, 2)
    return model


def _build_conv(dtype: torch.dtype) -> nn.Module:
    return ConvNet().to(dtype)


def _build_channels_last(dtype: torch.dtype) -> nn.Module:
    model = ConvNet().to(dtype).to(memory_format=torch.channels_last)
    w = model.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return model


def _build_zero_groups(dtype: torch.dtype) -> nn.Module:
    return ZeroGroupNet().to(dtype)


def _build_zero_size(dtype: torch.dtype) -> nn.Module:
    return ZeroSizeNet().to(dtype)


@dataclass(frozen=True)
class Layout:
    name: str
    build: Callable[[torch.dtype], nn.Module]
    targets: tuple[str, ...]  # parameters a parameter rule selects
    modules: tuple[str, ...]  # modules an activity rule selects
    input_shape: tuple[int, ...]
    channels_last: bool = False

    def make(self, dtype: torch.dtype, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build(dtype)
        _fill(model, seed)
        if isinstance(model, ZeroGroupNet):
            model.zero()
        assert all(p.dtype == dtype for p in model.parameters())
        return model

    def input(self, dtype: torch.dtype) -> Tensor:
        g = torch.Generator().manual_seed(123)
        x = torch.randn(self.input_shape, generator=g, dtype=torch.float64).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def param_selector(self) -> str:
        return "layer " + ", ".join(self.targets)

    @property
    def module_selector(self) -> str:
        return "layer " + ", ".join(self.modules)


LAYOUTS = {
    layout.name: layout
    for layout in [
        Layout("linear", _build_linear, ("body.weight",), ("body",), (BATCH, 6)),
        Layout("transposed", _build_transposed, ("body.weight",), ("body",), (BATCH, 6)),
        Layout("strided", _build_strided, ("body.weight",), ("body",), (BATCH, 6)),
        Layout("conv", _build_conv, ("conv.weight",), ("conv",), (BATCH, 3, 5, 5)),
        Layout("channels_last", _build_channels_last, ("conv.weight",), ("conv",), (BATCH, 3, 5, 5), True),
        Layout(
            "zero_groups", _build_zero_groups, ("conv.weight", "lin.weight", "dead.weight"), ("conv", "lin", "dead"),
            (BATCH, 3, 5, 5),
        ),
        Layout(
            "zero_size", _build_zero_size, ("empty.weight", "lin0.weight", "lin.weight"), ("empty", "lin0", "lin"),
            (BATCH, 4),
        ),
    ]
}


# ================================================================ plain reference formulas (float64)


def slices(w: Tensor, dim: int) -> list[Tensor]:
    return [w.select(dim, i) for i in range(w.shape[dim])]


def group_norm_sum(w: Tensor, dim: int) -> Tensor:
    return sum((s.square().sum().sqrt() for s in slices(w, dim)), torch.zeros((), dtype=w.dtype))


def group_norm_grad(w: Tensor, dim: int) -> Tensor:
    """d/dw Σ_i ||w_i||: w_i / ||w_i||, and 0 for an all-zero slice."""
    grad = torch.zeros_like(w)
    for i, s in enumerate(slices(w, dim)):
        norm = s.square().sum().sqrt()
        if norm > 0:
            grad.select(dim, i).copy_(s / norm)
    return grad


def as_matrix(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))


def orthogonal_value(w: Tensor) -> Tensor:
    m = as_matrix(w)
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    return (gram - torch.eye(gram.shape[0], dtype=w.dtype)).square().sum()


def orthogonal_grad(w: Tensor) -> Tensor:
    """d/dW ||G − I||²_F: 4(G − I)W for G = W Wᵀ, 4W(G − I) for G = Wᵀ W."""
    m = as_matrix(w)
    if m.shape[0] <= m.shape[1]:
        grad = 4 * (m @ m.T - torch.eye(m.shape[0], dtype=w.dtype)) @ m
    else:
        grad = 4 * m @ (m.T @ m - torch.eye(m.shape[1], dtype=w.dtype))
    return grad.reshape(w.shape)


def soft_threshold(w: Tensor, tau: float) -> Tensor:
    return torch.sign(w) * torch.clamp(w.abs() - tau, min=0.0)


def renorm(w: Tensor, dim: int, c: float) -> Tensor:
    """Each slice along ``dim`` with norm > c scaled by c / (norm + 1e-7) (torch.renorm's rule)."""
    out = w.clone()
    for i, s in enumerate(slices(w, dim)):
        norm = s.square().sum().sqrt()
        if norm > c:
            out.select(dim, i).copy_(s * (c / (norm + 1e-7)))
    return out


def midpoint_norm(dim: int, weights: list[Tensor]) -> float:
    """A max_norm limit half-way between two nonzero slice norms: some slices are above it, some not."""
    norms = sorted(n for w in weights for s in slices(w, dim) if (n := float(s.square().sum().sqrt())) > 0)
    k = len(norms) // 2
    return round((norms[k - 1] + norms[k]) / 2, 6)


# ================================================================ REFERENCES: how to exercise each kind


@dataclass(frozen=True)
class LossRef:
    """A loss term: ``penalty()`` = Σ over targets of ``strength · value(w, w0)``; grad ``strength · grad(w, w0)``."""

    rule: str  # template: {sel} the parameter selector, {s} the strength
    strength: float
    value: Callable[[Tensor, Tensor | None], Tensor]
    grad: Callable[[Tensor, Tensor | None], Tensor]
    anchor: str | None = None  # "init" or "ref": w0 for l2 ... to


@dataclass(frozen=True)
class StepRef:
    """A term that acts through the optimizer step: the targets' weights after one SGD step
    from w with gradient g are ``update(w, g, lr, strength)``; other weights get plain SGD."""

    rule: str
    strength: float | Callable[[list[Tensor]], float]  # or chosen from the targets after plain SGD
    update: Callable[[Tensor, Tensor, float, float], Tensor]
    group: Callable[[float, float], dict[str, float]]  # (base lr, strength) -> the targets' group settings


@dataclass(frozen=True)
class ActivityRef:
    """A term on module outputs: ``penalty()`` = Σ over selected outputs a of ``strength · value(a)``."""

    rule: str  # template: {sel} the module selector, {s} the strength
    strength: float
    value: Callable[[Tensor], Tensor]


Reference = LossRef | StepRef | ActivityRef


def _default_group(lr: float, s: float) -> dict[str, float]:
    return {"weight_decay": 0.0, "lr": lr}


def _sgd(w: Tensor, g: Tensor, lr: float, s: float) -> Tensor:
    return w - lr * g


REFERENCES: dict[str, list[Reference]] = {
    "decay": [
        StepRef(
            "{sel} decay {s}", 0.3,
            update=lambda w, g, lr, s: w - lr * (g + s * w),  # SGD's coupled weight decay
            group=lambda lr, s: {"weight_decay": s, "lr": lr},
        ),
    ],
    "l1": [
        LossRef("{sel} l1 {s}", 0.3, value=lambda w, _: w.abs().sum(), grad=lambda w, _: torch.sign(w)),
        StepRef(
            "{sel} l1 {s} prox", 2.0,
            update=lambda w, g, lr, s: soft_threshold(w - lr * g, lr * s),
            group=_default_group,
        ),
    ],
    "l2": [
        LossRef("{sel} l2 {s}", 0.3, value=lambda w, _: w.square().sum() / 2, grad=lambda w, _: w),
        LossRef(
            "{sel} l2 {s} to init", 0.7, anchor="init",
            value=lambda w, w0: (w - w0).square().sum() / 2, grad=lambda w, w0: w - w0,
        ),
        LossRef(
            "{sel} l2 {s} to ref", 0.7, anchor="ref",
            value=lambda w, w0: (w - w0).square().sum() / 2, grad=lambda w, w0: w - w0,
        ),
    ],
    "group_lasso": [
        LossRef(
            "{sel} group_lasso {s}", 0.3,  # default dim=0
            value=lambda w, _: group_norm_sum(w, 0), grad=lambda w, _: group_norm_grad(w, 0),
        ),
        LossRef(
            "{sel} group_lasso {s} dim=0", 0.3,
            value=lambda w, _: group_norm_sum(w, 0), grad=lambda w, _: group_norm_grad(w, 0),
        ),
        LossRef(
            "{sel} group_lasso {s} dim=1", 0.3,
            value=lambda w, _: group_norm_sum(w, 1), grad=lambda w, _: group_norm_grad(w, 1),
        ),
        LossRef(
            "{sel} group_lasso {s} dim=-1", 0.3,
            value=lambda w, _: group_norm_sum(w, w.ndim - 1), grad=lambda w, _: group_norm_grad(w, w.ndim - 1),
        ),
    ],
    "orthogonal": [
        LossRef("{sel} orthogonal {s}", 0.05, value=lambda w, _: orthogonal_value(w), grad=lambda w, _: orthogonal_grad(w)),
    ],
    "max_norm": [
        StepRef(
            "{sel} max_norm {s}", partial(midpoint_norm, 0),  # default dim=0
            update=lambda w, g, lr, c: renorm(w - lr * g, 0, c), group=_default_group,
        ),
        StepRef(
            "{sel} max_norm {s} dim=1", partial(midpoint_norm, 1),
            update=lambda w, g, lr, c: renorm(w - lr * g, 1, c), group=_default_group,
        ),
    ],
    "lr_mult": [
        StepRef(
            "{sel} lr_mult {s}", 0.25,
            update=lambda w, g, lr, s: w - s * lr * g,
            group=lambda lr, s: {"weight_decay": 0.0, "lr": s * lr, "lr_mult": s},
        ),
    ],
    # {s} is lr_decay D. Parameters no depth rule reaches would count as the deepest; here
    # 'all' gives every other one a depth, so no RD206.
    "depth": [
        StepRef(
            "lr_decay {s}\nall depth 2\n{sel} depth 0", 0.5,  # deepest 2: the targets get D²
            update=lambda w, g, lr, s: w - s**2 * lr * g,
            group=lambda lr, s: {"weight_decay": 0.0, "lr": s**2 * lr, "lr_mult": s**2},
        ),
        StepRef(
            "lr_decay {s}\nall depth last\n{sel} depth 1", 0.5,  # last = 1 + 1: the targets get D¹
            update=lambda w, g, lr, s: w - s * lr * g,
            group=lambda lr, s: {"weight_decay": 0.0, "lr": s * lr, "lr_mult": s},
        ),
    ],
    "activity_l1": [
        ActivityRef("{sel} activity l1 {s}", 0.3, value=lambda a: a.abs().sum() / a.shape[0]),
    ],
    "activity_l2": [
        ActivityRef("{sel} activity l2 {s}", 0.3, value=lambda a: a.square().sum() / 2 / a.shape[0]),
    ],
}


def test_every_kind_has_a_reference() -> None:
    assert set(VALUE_TERMS) <= set(REFERENCES), f"kinds without a reference: {set(VALUE_TERMS) - set(REFERENCES)}"
    assert set(REFERENCES) <= set(VALUE_TERMS), f"references for unknown kinds: {set(REFERENCES) - set(VALUE_TERMS)}"
    for kind, refs in REFERENCES.items():
        assert refs, kind
        for ref in refs:
            # The rule text really sets this kind (explain() reads back only the kind's name).
            spec = regdsl.parse(ref.rule.format(sel="all", s=1))
            # A depth rule needs lr_decay and a default depth beside it; every rule sets only this kind.
            assert spec.statements and all([t.kind for t in rule.terms] == [kind] for rule in spec.statements), ref.rule


# ================================================================ the battery


def _close(got: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    rtol = RTOL[dtype]
    # Absolute slack relative to the tensor's scale: entries that cancel to ~0 carry the rounding of the big ones.
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        got.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1.0) * 1e-1, msg=lambda m: f"{what}: {m}"
    )


def _named(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _rules(rule: str, sel: str, strength: float, form: str) -> regdsl.Spec:
    """The rule with its strength as a number, or (form "space") as a named search space that
    ``with_values`` gives the same number: both must do exactly what the reference says."""
    if form == "number":
        return regdsl.parse(rule.format(sel=sel, s=strength))
    spaced = regdsl.parse(rule.format(sel=sel, s=f"choice({2 * strength + 1!r}, {strength!r}) as lam"))
    assert spaced.spaces().keys() == {"lam"}
    return spaced.with_values({"lam": strength})


def _run_loss(layout: Layout, ref: LossRef, dtype: torch.dtype, form: str = "number") -> None:
    model = layout.make(dtype)
    params = _named(model)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    reference = None
    if ref.anchor == "ref":
        g = torch.Generator().manual_seed(7)
        reference = {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype) for k, v in model.state_dict().items()}
    reg = _rules(ref.rule, layout.param_selector, ref.strength, form).compile(model, reference=reference)
    if ref.anchor == "init":
        # Move the weights after compiling (zero entries stay zero): w0 is the copy from before.
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in params.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * (p != 0))
    anchors = {"init": w0, "ref": reference}.get(ref.anchor or "", {})

    penalty = reg.penalty()
    assert penalty.shape == () and penalty.dtype == dtype
    expected = torch.zeros((), dtype=torch.float64)
    for name in layout.targets:
        w = params[name].detach().double()
        a = anchors[name].double() if anchors else None
        expected = expected + ref.strength * ref.value(w, a)
    assert torch.isfinite(penalty)
    _close(penalty.detach(), expected, dtype, "penalty")

    penalty.backward()
    for name, p in params.items():
        if name in layout.targets:
            assert p.grad is not None or p.numel() == 0, name
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            assert torch.isfinite(got).all(), f"{name}: non-finite gradient {got}"
            w = p.detach().double()
            a = anchors[name].double() if anchors else None
            _close(got, ref.strength * ref.grad(w, a), dtype, f"grad of {name}")
        else:
            assert p.grad is None or not p.grad.any(), f"{name} is not selected but got a gradient"


def _set_grads(model: nn.Module) -> dict[str, Tensor]:
    """A fixed gradient for every parameter, zero where the weight is zero (zero groups stay zero under SGD)."""
    g = torch.Generator().manual_seed(3)
    grads = {}
    for name, p in model.named_parameters():
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * (p.detach() != 0)
        p.grad = grad
        grads[name] = grad.clone()
    return grads


def _run_step(layout: Layout, ref: StepRef, dtype: torch.dtype, mode: str, form: str = "number") -> None:
    model = layout.make(dtype)
    params = _named(model)
    grads = _set_grads(model)
    before = {n: p.detach().double().clone() for n, p in params.items()}
    plain = {n: _sgd(before[n], grads[n].double(), LR, 0.0) for n in params}
    strength = ref.strength if isinstance(ref.strength, float) else ref.strength([plain[n] for n in layout.targets])

    reg = _rules(ref.rule, layout.param_selector, strength, form).compile(model)
    assert float(reg.penalty().detach()) == 0.0  # acts through the optimizer, never through the loss

    groups = reg.param_groups(lr=LR)
    listed = [id(p) for group in groups for p in group["params"]]
    assert sorted(listed) == sorted(id(p) for p in params.values())  # each trainable tensor exactly once
    for name, p in params.items():
        (group,) = [gr for gr in groups if any(q is p for q in gr["params"])]
        want = ref.group(LR, strength) if name in layout.targets else _default_group(LR, strength)
        got = {k: group.get(k, 0.0 if k == "weight_decay" else None) for k in want}
        assert got == pytest.approx(want, rel=1e-12), (name, group)

    opt = torch.optim.SGD(groups, lr=LR)
    if mode == "attach":
        reg.attach(opt)
        opt.step()
    else:
        opt.step()
        reg.after_step(opt)
    assert reg.step == 1

    changed = False
    for name, p in params.items():
        if name in layout.targets:
            expected = ref.update(before[name], grads[name].double(), LR, strength)
            changed = changed or not torch.equal(expected, plain[name])
        else:
            expected = plain[name]
        got = p.detach()
        assert got.shape == expected.shape and torch.isfinite(got).all(), name
        _close(got, expected, dtype, f"{name} after one step")
        zeros = expected == 0
        assert bool((got[zeros] == 0).all()), f"{name}: expected exact zeros at {zeros.nonzero().tolist()}, got {got}"
    assert changed, "the term had no effect on the weights: the case does not test it"


def _run_activity(layout: Layout, ref: ActivityRef, dtype: torch.dtype, form: str = "number") -> None:
    model = layout.make(dtype)
    modules = dict(model.named_modules())
    outputs: list[Tensor] = []
    handles = [modules[n].register_forward_hook(lambda m, args, out: outputs.append(out)) for n in layout.modules]
    reg = _rules(ref.rule, layout.module_selector, ref.strength, form).compile(model)
    model(layout.input(dtype))
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(layout.modules)

    expected = torch.zeros((), dtype=torch.float64)
    for a in outputs:
        expected = expected + ref.strength * ref.value(a.double())
    params = _named(model)
    want = torch.autograd.grad(expected, list(params.values()), retain_graph=True, allow_unused=True)

    penalty = reg.penalty()
    assert penalty.shape == () and penalty.dtype == dtype
    _close(penalty.detach(), expected.detach(), dtype, "penalty")
    penalty.backward()
    for (name, p), w in zip(params.items(), want, strict=True):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.isfinite(got).all(), name
        _close(got, w if w is not None else torch.zeros_like(p), dtype, f"grad of {name}")
    assert float(reg.penalty().detach()) == 0.0  # consumed by the first penalty()


@pytest.mark.parametrize("few", [0, 3], ids=["function", "autograd"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("kind", VALUE_TERMS)
def test_battery(kind: str, dtype: torch.dtype, layout: str, few: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # l1/l2 of at most penalties.FEW small tensors are plain ops autograd differentiates, more
    # tensors one closed-form Function: every layout here has 1 to 3 tensors, so both are run.
    monkeypatch.setattr(penalties, "FEW", few)
    refs = REFERENCES.get(kind)
    assert refs, f"'{kind}' has no entry in REFERENCES"
    case = LAYOUTS[layout]
    for ref in refs:
        if isinstance(ref, LossRef):
            _run_loss(case, ref, dtype)
        elif isinstance(ref, StepRef):
            for mode in ("attach", "after_step"):
                _run_step(case, ref, dtype, mode)
        else:
            _run_activity(case, ref, dtype)


@pytest.mark.parametrize("layout", ["linear", "conv"])
@pytest.mark.parametrize("kind", [k for k in VALUE_TERMS if k != "depth"])  # a depth is no number to tune
def test_battery_with_the_strength_from_a_search_space(kind: str, layout: str) -> None:
    # The same references, the strength written as `choice(...) as lam` and set by with_values.
    case = LAYOUTS[layout]
    for ref in REFERENCES[kind]:
        if isinstance(ref, LossRef):
            _run_loss(case, ref, torch.float64, form="space")
        elif isinstance(ref, StepRef):
            _run_step(case, ref, torch.float64, "attach", form="space")
        else:
            _run_activity(case, ref, torch.float64, form="space")


# ================================================================ named cases the battery covers, spelled out


def test_prox_exact_zeros_where_within_threshold() -> None:
    """l1 λ prox: after an SGD step, |w| <= lr·λ becomes exactly 0, the rest moves lr·λ toward 0."""
    lam = 2.0
    model = LAYOUTS["linear"].make(torch.float32)
    _set_grads(model)
    w = model.body.weight
    after_sgd = (w.detach() - LR * w.grad).clone()
    inside = after_sgd.abs() <= LR * lam
    assert 0 < int(inside.sum()) < inside.numel()
    reg = regdsl.parse(f"layer body.weight l1 {lam} prox").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg.attach(opt)
    opt.step()
    assert bool((w.detach()[inside] == 0).all())
    assert bool((w.detach()[~inside] != 0).all())
    torch.testing.assert_close(w.detach()[~inside], (after_sgd - LR * lam * after_sgd.sign())[~inside], rtol=1e-5, atol=1e-6)


def test_prox_threshold_uses_each_group_lr() -> None:
    """τ = lr of the parameter's own group · λ (here lr_mult puts body.weight in a group with lr 0.5·LR)."""
    lam = 2.0
    model = LAYOUTS["linear"].make(torch.float64)
    grads = _set_grads(model)
    w = model.body.weight
    before = w.detach().clone()
    reg = regdsl.parse(f"layer body.weight l1 {lam} prox lr_mult 0.5").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR))
    opt.step()
    reg.after_step(opt)
    lr = 0.5 * LR
    expected = soft_threshold(before - lr * grads["body.weight"], lr * lam)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)


def test_max_norm_scales_only_slices_above_the_limit() -> None:
    model = LAYOUTS["conv"].make(torch.float64)
    w = model.conv.weight
    with torch.no_grad():
        w.mul_(torch.tensor([0.1, 3.0, 0.2, 5.0, 1.0], dtype=torch.float64).view(5, 1, 1, 1))
    norms = w.detach().flatten(1).norm(dim=1)
    c = 1.5
    over = norms > c
    assert 0 < int(over.sum()) < 5
    before = w.detach().clone()
    reg = regdsl.parse(f"layer conv.weight max_norm {c}").compile(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.step()
    reg.after_step(opt)
    after = w.detach()
    torch.testing.assert_close(after[~over], before[~over], rtol=0, atol=0)  # untouched, bit for bit
    scale = (c / (norms[over] + 1e-7)).view(-1, 1, 1, 1)
    torch.testing.assert_close(after[over], before[over] * scale, rtol=1e-12, atol=0)
    assert float(after.flatten(1).norm(dim=1).max()) <= c
    torch.testing.assert_close(after, torch.renorm(before, 2, 0, c), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_zero_slice_gradient_is_zero(dim: int, dtype: torch.dtype) -> None:
    model = LAYOUTS["zero_groups"].make(dtype)
    reg = regdsl.parse(f"layer lin.weight group_lasso 1 dim={dim}").compile(model)
    reg.penalty().backward()
    grad = model.lin.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    zero_slice = 1 if dim == 0 else 2
    assert not grad.select(dim, zero_slice).any()
    assert grad.select(dim, 0).abs().sum() > 0


def test_orthogonal_wide_tall_and_conv_closed_form() -> None:
    """Wide (4, 6) -> G = W Wᵀ; tall (6, 4) -> G = Wᵀ W; conv (5, 3, 3, 3) -> W (5, 27), G = W Wᵀ."""
    lam = 0.05
    for layout, name in [("linear", "body.weight"), ("transposed", "body.weight"), ("conv", "conv.weight")]:
        model = LAYOUTS[layout].make(torch.float64)
        p = _named(model)[name]
        reg = regdsl.parse(f"layer {name} orthogonal {lam}").compile(model)
        penalty = reg.penalty()
        m = p.detach().reshape(p.shape[0], -1)
        small = min(m.shape)
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        assert gram.shape == (small, small)
        torch.testing.assert_close(penalty, lam * (gram - torch.eye(small, dtype=torch.float64)).square().sum(), rtol=1e-10, atol=0)
        penalty.backward()
        # An independent second reference: autograd through the plain formula on a copy.
        copy = p.detach().clone().requires_grad_(True)
        (lam * orthogonal_value(copy)).backward()
        torch.testing.assert_close(p.grad, copy.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.grad, lam * orthogonal_grad(p.detach()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", VALUE_TERMS)
def test_only_zero_size_parameters(kind: str) -> None:
    """Every kind on zero-size tensors only: compiles, penalty() is 0, a step runs, nothing crashes."""
    layout = Layout("zero_only", _build_zero_size, ("empty.weight", "lin0.weight"), ("empty",), (BATCH, 4))
    for ref in REFERENCES[kind]:
        model = layout.make(torch.float32)
        strength = ref.strength if isinstance(ref.strength, float) else 1.0
        sel = layout.module_selector if isinstance(ref, ActivityRef) else layout.param_selector
        reference = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
        reg = regdsl.parse(ref.rule.format(sel=sel, s=strength)).compile(model, reference=reference)
        model(layout.input(torch.float32))
        penalty = reg.penalty()
        assert penalty.shape == () and float(penalty.detach()) == 0.0
        if penalty.requires_grad:
            penalty.backward()
        _set_grads(model)
        opt = torch.optim.SGD(reg.param_groups(lr=LR))
        reg.attach(opt)
        opt.step()
        assert reg.step == 1
        assert model.empty.weight.shape == (0, 4) and model.lin0.weight.shape == (3, 0)


@pytest.mark.parametrize("anchor", ["init", "ref"])
def test_l2_to_anchor_is_zero_until_the_weights_move(anchor: str) -> None:
    model = LAYOUTS["linear"].make(torch.float64)
    w = model.body.weight
    reference = {k: v.clone() for k, v in model.state_dict().items()} if anchor == "ref" else None
    reg = regdsl.parse(f"layer body.weight l2 0.7 to {anchor}").compile(model, reference=reference)
    assert float(reg.penalty().detach()) == 0.0
    w0 = w.detach().clone()
    with torch.no_grad():
        w.add_(0.25)
    torch.testing.assert_close(reg.penalty().detach(), 0.7 / 2 * (w.detach() - w0).square().sum(), rtol=1e-10, atol=0)


# ================================================================ validation errors reach the user with positions


def _term_error(text: str, model: nn.Module, term: str) -> regdsl.RegCompileError:
    with pytest.raises(regdsl.RegCompileError) as info:
        regdsl.parse(text).compile(model)
    err = info.value
    (diag,) = err.diagnostics
    assert diag.code == "RD104"
    lines = text.split("\n")
    line = next(i for i, s in enumerate(lines, 1) if f" {term} " in s)
    assert (diag.line, diag.column) == (line, lines[line - 1].index(f" {term} ") + 2)
    assert diag.source_line == lines[line - 1]
    assert f"{err.file}:{line}:{diag.column}:" in str(err) and "RD104" in str(err)
    return err


def test_orthogonal_on_bias_is_rd104_at_the_term() -> None:
    text = "all l2 0.01\nlayer body.bias   orthogonal 0.5 warmup 3\n"
    err = _term_error(text, LAYOUTS["linear"].make(torch.float32), "orthogonal")
    assert "body.bias" in err.diagnostics[0].message


@pytest.mark.parametrize("term", ["group_lasso 1 dim=2", "group_lasso 1 dim=-3", "max_norm 1 dim=2"])
def test_dim_out_of_range_on_linear_weight_is_rd104(term: str) -> None:
    text = f"# header\n\nlayer body.weight l1 0.1 {term}\n"
    err = _term_error(text, LAYOUTS["linear"].make(torch.float32), term.split()[0])
    assert "body.weight" in err.diagnostics[0].message and "dim=" in err.diagnostics[0].message


def test_rd104_from_a_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "rules.reg"
    path.write_text("layer body.bias orthogonal 0.5\n")
    with pytest.raises(regdsl.RegCompileError) as info:
        regdsl.compile(path, LAYOUTS["linear"].make(torch.float32))
    (diag,) = info.value.diagnostics
    assert diag.code == "RD104" and (diag.line, diag.column) == (1, 17)
    assert diag.file.endswith("rules.reg")


@pytest.mark.parametrize(
    "text", ["layer body.bias orthogonal 0", "layer body.weight group_lasso 0 dim=2", "layer body.bias orthogonal 0 warmup 5"]
)
def test_zero_strength_on_an_unusable_parameter_compiles(text: str) -> None:
    model = LAYOUTS["linear"].make(torch.float32)
    reg = regdsl.parse(text).compile(model)
    assert float(reg.penalty().detach()) == 0.0


# ---------------------------------------------------------------- RD105: the reference of 'l2 ... to ref'


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)


def _rd105(text: str, model: nn.Module, reference) -> regdsl.Diagnostic:
    with pytest.raises(regdsl.RegCompileError) as caught:
        regdsl.parse(text, "ref.reg").compile(model, reference=reference)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "RD105" and diagnostic.file == "ref.reg"
    return diagnostic


def test_to_ref_without_a_reference_is_an_error_at_the_term() -> None:
    d = _rd105("layer a.weight l2 0.5 to ref\n", _Two(), None)
    assert (d.line, d.column) == (1, 16)
    assert "no reference was given" in d.message and "reference=state_dict" in d.message


def test_to_ref_names_the_parameters_the_reference_lacks_or_gets_wrong() -> None:
    model = _Two()
    reference = {"a.weight": torch.zeros(4, 3)}  # no b.weight
    d = _rd105("all l2 0.5 to ref\nexclude bias\n", model, reference)
    assert "has no entry for 'b.weight'" in d.message and "a.weight" not in d.message
    reference = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(2, 4)}
    d = _rd105("all l2 0.5 to ref\nexclude bias\n", model, reference)
    assert "'a.weight' has shape (3, 4), the parameter (4, 3), for 'a.weight'" in d.message


def test_to_ref_of_strength_zero_needs_no_reference() -> None:
    reg = regdsl.parse("all l2 0 to ref").compile(_Two())
    assert float(reg.penalty()) == 0.0


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_to_ref_reads_wrapped_state_dict_keys_and_converts_dtype(prefix: str) -> None:
    # A state_dict saved from a DDP- or torch.compile-wrapped model, in float64, for a float32 model.
    model = _Two()
    w0 = torch.randn(4, 3, dtype=torch.float64)
    reference = {f"{prefix}a.weight": w0, f"{prefix}a.bias": torch.zeros(4, dtype=torch.float64)}
    reg = regdsl.parse("layer a.weight l2 0.5 to ref").compile(model, reference=reference)
    expected = 0.5 / 2 * ((model.a.weight.detach().double() - w0.float().double()) ** 2).sum()
    value = reg.penalty()
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    # The reference is a copy: changing the state_dict afterwards changes nothing.
    w0.zero_()
    torch.testing.assert_close(reg.penalty(), value)


# ---------------------------------------------------------------- real models: GPT-2 and BERT


def _hf_reference(model: nn.Module, terms_for) -> torch.Tensor:
    """Σ over named_parameters() (a tied tensor once) of the plain formulas, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        w = p.detach().double()
        for kind, value in terms_for(name, p).items():
            if kind == "orthogonal":
                m = w.reshape(w.shape[0], -1)
                g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                total += value * ((g - torch.eye(g.shape[0], dtype=torch.float64)) ** 2).sum()
            elif kind == "group_lasso_dim1":
                total += value * w.pow(2).sum(dim=0).sqrt().sum()
            elif kind == "l2_to_init":
                total += value / 2 * ((w - INIT[name]) ** 2).sum()
    return total


INIT: dict[str, torch.Tensor] = {}


def test_gpt2_conv1d_tied_head_and_activity_on_the_mlp() -> None:
    pytest.importorskip("transformers")
    from models import gpt2

    model = gpt2()
    rules = (
        "type Conv1D layer **.weight orthogonal 1e-3 group_lasso 1e-2 dim=1\n"
        "layer lm_head.weight l2 0.1 to init\n"  # the tied wte/lm_head tensor, penalized once
        "layer transformer.h.*.mlp activity l2 1e-3\n"
    )
    reg = regdsl.parse(rules).compile(model)
    INIT.clear()
    INIT["transformer.wte.weight"] = model.transformer.wte.weight.detach().double().clone()
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.01)  # move away from init: the anchor term is not 0

    def terms_for(name: str, p: torch.Tensor) -> dict[str, float]:
        if name == "transformer.wte.weight":
            return {"l2_to_init": 0.1}
        # GPT-2's Conv1D weights are attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (stored in, out).
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            return {"orthogonal": 1e-3, "group_lasso_dim1": 1e-2}
        return {}

    outputs = []
    for block in model.transformer.h:
        block.mlp.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().double()))
    ids = torch.randint(100, (3, 8), generator=torch.Generator().manual_seed(0))
    model(ids)
    activity = sum(1e-3 / 2 * (a**2).sum() / a.shape[0] for a in outputs)
    expected = _hf_reference(model, terms_for) + activity
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-5, atol=1e-6)


def test_bert_orthogonal_on_attention_and_prox_on_the_tied_decoder() -> None:
    pytest.importorskip("transformers")
    from models import bert

    model = bert()
    rules = "layer **.attention.self.*.weight orthogonal 1e-2\nembedding l1 0.5 prox\n"
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt)

    def terms_for(name: str, p: torch.Tensor) -> dict[str, float]:
        return {"orthogonal": 1e-2} if ".attention.self." in name and name.endswith("weight") else {}

    torch.testing.assert_close(reg.penalty().double(), _hf_reference(model, terms_for), rtol=1e-5, atol=1e-6)
    # One step without gradients: only the proximal step moves the embeddings (the decoder is tied
    # to word_embeddings, so it is one tensor and thresholded once: by lr·λ = 0.05, not twice).
    words = model.bert.embeddings.word_embeddings.weight
    before = words.detach().clone()
    opt.step()
    expected = torch.sign(before) * torch.clamp(before.abs() - 0.05, min=0)
    torch.testing.assert_close(words.detach(), expected)
    assert model.cls.predictions.decoder.weight is words


def test_to_ref_prefers_the_key_as_written_when_a_child_is_called_module() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = _Two()  # the user's own attribute, not a DDP wrapper

    model = Wrapper()
    reference = {k: v + 1 for k, v in model.state_dict().items()}
    reg = regdsl.parse("layer module.a.weight l2 2.0 to ref").compile(model, reference=reference)
    torch.testing.assert_close(reg.penalty(), torch.tensor(2.0 / 2 * 12))  # (w - (w+1))² = 1 per element


def test_an_activity_rule_selects_a_module_registered_twice_by_either_name() -> None:
    """'layer P' matches a module by any name it is registered under, as it matches a shared
    parameter by any of its names; the module's output counts at each call (docs/language.md)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = nn.Linear(3, 3)
            self.again = self.blk  # the same module under a second name

        def forward(self, x: Tensor) -> Tensor:
            return self.again(self.blk(x))

    torch.manual_seed(0)
    model, x = Twice(), torch.randn(4, 3)
    first = model.blk(x).detach()
    second = model.blk(first).detach()
    expected = 0.1 * (first.abs().sum() + second.abs().sum()) / 4  # activity l1 λ: λ·Σ|a|/B per call
    for name in ("blk", "again"):
        reg = regdsl.parse(f"layer {name} activity l1 0.1\n").compile(model)
        model(x)
        torch.testing.assert_close(reg.penalty().detach(), expected, msg=name)
        reg.detach()
