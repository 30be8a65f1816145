"""attach(optimizer, fold=True) at the edges: missing, frozen, sparse and complex gradients, several
optimizers, closures, half precision, the chunked kernels, moved models, loaded references,
allocations per step, CUDA. Expected values are plain torch formulas written here."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from models import MLP, seeded
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl
from regdsl import fold, fold_kernels
from regdsl.errors import RegUsageError

RULES = (
    "layer fc1.weight l1 0.05\n"
    "layer fc2.weight l2 0.3 to init group_lasso 0.1\n"
    "layer head.weight orthogonal 0.02 l2 0.1\n"
    "layer fc2.bias group_lasso 0.2\n"
)


def term_grads(model: nn.Module, w0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of RULES' penalty, by autograd through the plain formulas, in float64."""
    named = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    w = named
    gram = w["head.weight"] @ w["head.weight"].T  # head is 3x16: the smaller Gram matrix is W Wᵀ
    total = (
        0.05 * w["fc1.weight"].abs().sum()
        + 0.15 * (w["fc2.weight"] - w0["fc2.weight"].double()).square().sum()
        + 0.1 * torch.linalg.vector_norm(w["fc2.weight"], 2, dim=1).sum()
        + 0.02 * (gram - torch.eye(3, dtype=torch.float64)).square().sum()
        + 0.05 * w["head.weight"].square().sum()
        + 0.2 * w["fc2.bias"].abs().sum()
    )
    total.backward()
    return {n: p.grad for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}


def setup(
    dtype: torch.dtype = torch.float32, rules: str = RULES
) -> tuple[MLP, regdsl.Regularizer, dict[str, torch.Tensor]]:
    seeded(0)
    model = MLP().to(dtype)
    with torch.no_grad():
        model.fc2.weight[2].zero_()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = regdsl.parse(rules).compile(model)
    with torch.no_grad():  # move away from init so 'to init' has something to pull
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
    return model, reg, w0


def folded_grads(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Run the fold with every gradient zero (lr 0: the weights stay) and read what it added."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return {n: p.grad for n, p in model.named_parameters() if p.grad.abs().sum() > 0}


def assert_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_formulas() -> None:
    model, reg, w0 = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    assert_grads(folded_grads(model, opt), term_grads(model, w0), rtol=1e-5, atol=1e-7)


def test_a_parameter_without_gradient_gets_the_terms_gradient() -> None:
    # As the loss path would give it one: the penalty alone is its gradient.
    model, reg, w0 = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    opt.zero_grad(set_to_none=True)
    model.fc1.weight.requires_grad_(False)  # frozen after compile(): no gradient, as on the loss path
    opt.step()
    want = term_grads(model, w0)
    del want["fc1.weight"]
    assert model.fc1.weight.grad is None and model.fc1.bias.grad is None
    assert_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("width", [16, 160], ids=["small", "over 64 KiB"])
@pytest.mark.parametrize(
    "term", ["l1 0.05", "l2 0.3", "l2 0.3 to init", "group_lasso 0.1", "orthogonal 0.02", "l1 0.05 l2 0.3"]
)
def test_a_parameter_frozen_with_a_zero_gradient_left_gets_nothing(term: str, width: int) -> None:
    """zero_grad(set_to_none=False) leaves a frozen parameter its zero gradient, which the optimizer
    still steps: the fold must add nothing to it, as the loss path's autograd adds nothing."""
    seeded(0)
    model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, 4))
    reg = regdsl.parse(f"all {term}\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=True)
    x = torch.randn(8, width)
    model(x).square().mean().backward()
    opt.step()  # every weight has a gradient tensor now
    model[0].weight.requires_grad_(False)
    for _ in range(2):
        frozen = model[0].weight.detach().clone()
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
        assert torch.equal(model[0].weight.grad, torch.zeros_like(frozen))
        assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[1].weight.grad, torch.zeros_like(model[1].weight))  # the others still fold


def test_sparse_gradients_become_dense_as_autograd_would_make_them() -> None:
    seeded(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    reg = regdsl.parse("layer 0.weight l2 0.1 l1 0.01").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    ids = torch.tensor([1, 3, 3])
    model(ids).sum().backward()
    assert model[0].weight.grad.is_sparse
    w = model[0].weight.detach().clone().requires_grad_()
    (nn.functional.embedding(ids, w) @ model[1].weight.detach().T).sum().backward()
    want = w.grad + 0.1 * w.detach() + 0.01 * w.detach().sign()
    opt.step()
    assert not model[0].weight.grad.is_sparse
    torch.testing.assert_close(model[0].weight.grad, want)


class ComplexLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.cfloat))
        self.v = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.cfloat) @ self.w).abs().sum() + (x @ self.v).sum()


def test_complex_parameters_stay_on_the_loss_path() -> None:
    seeded(0)
    model = ComplexLayer()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    torch.testing.assert_close(reg.penalty(), 0.05 * model.w.detach().abs().square().sum())
    reg.penalty().backward()
    opt.step()
    w = model.w.detach().clone().requires_grad_()
    (0.05 * (w * w.conj()).real.sum()).backward()
    torch.testing.assert_close(model.w.grad, w.grad)  # once, through the loss
    torch.testing.assert_close(model.v.grad, 0.1 * model.v.detach())  # folded


def test_terms_of_parameters_another_optimizer_steps_stay_in_penalty() -> None:
    model, reg, _ = setup(rules="all l2 0.1")
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    head = [model.head.weight, model.head.bias]
    opt_body, opt_head = torch.optim.SGD(body, lr=0.0), torch.optim.SGD(head, lr=0.0)
    reg.attach(opt_body, fold=True)
    torch.testing.assert_close(reg.penalty(), 0.05 * sum(p.detach().square().sum() for p in head))
    opt_body.zero_grad()
    opt_head.zero_grad()
    reg.penalty().backward()
    opt_body.step()
    opt_head.step()
    for p in body + head:
        torch.testing.assert_close(p.grad, 0.1 * p.detach())


def test_a_step_with_a_closure_is_refused() -> None:
    model, reg, _ = setup()
    opt = torch.optim.LBFGS(model.parameters())
    reg.attach(opt, fold=True)
    with pytest.raises(RegUsageError, match="closure"):
        opt.step(lambda: model(torch.randn(2, 6)).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_precision(dtype: torch.dtype) -> None:
    model, reg, w0 = setup(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    got = folded_grads(model, opt)
    assert all(g.dtype == dtype for g in got.values())
    tol = {"rtol": 1e-2, "atol": 1e-3} if dtype != torch.float64 else {"rtol": 1e-12, "atol": 1e-14}
    assert_grads(got, term_grads(model, w0), **tol)


def test_chunked_kernels_for_devices_with_a_caching_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off the CPU, sign(w) and w − w₀ go through _foreach temporaries a chunk at a time.
    monkeypatch.setattr(fold.FoldPlan, "scratch_devices", ())
    monkeypatch.setattr(fold_kernels, "FEW", 0)  # every bucket through _foreach calls
    monkeypatch.setattr(fold_kernels, "CHUNK", 160)  # bytes: every tensor its own chunk, or two small ones together
    model, reg, w0 = setup(rules=RULES + "layer fc1.bias l1 0.05\nlayer head.bias l1 0.05")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    want = term_grads(model, w0)
    for name in ("fc1.bias", "head.bias"):
        want[name] = 0.05 * getattr(model, name.split(".")[0]).bias.detach().double().sign()
    assert_grads(folded_grads(model, opt), want, rtol=1e-5, atol=1e-7)


def test_a_model_moved_after_attach_is_followed() -> None:
    model, reg, w0 = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    folded_grads(model, opt)
    model.double()
    got = folded_grads(model, opt)
    assert all(g.dtype == torch.float64 for g in got.values())
    assert_grads(got, term_grads(model, w0), rtol=1e-12, atol=1e-14)


PART_CAST_TERMS = ["l1 0.1", "l2 0.3", "l2 0.3 to init", "l1 0.1 l2 0.3", "group_lasso 0.2", "orthogonal 0.05"]


@pytest.mark.parametrize("path", ["fold", "loss"])
@pytest.mark.parametrize("term", PART_CAST_TERMS)
def test_one_submodule_cast_after_attach_is_followed(term: str, path: str) -> None:
    """model[1].double() after attach: its weight's terms are computed in float64 with float64 strengths,
    though it shares its buckets with a weight still float32 (200x200: the large-tensor kernels)."""
    seeded(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 200))
    w0 = model[1].weight.detach().clone()
    reg = regdsl.parse(f"all {term}\nexclude bias").compile(model)
    with torch.no_grad():  # away from init, for 'to init'
        model[1].weight.add_(0.01 * torch.randn(200, 200, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=path == "fold")
    model[1].double()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    penalty = reg.penalty()
    if penalty.requires_grad:
        penalty.backward()
    opt.step()
    w = model[1].weight.detach().clone().requires_grad_()
    words = term.replace(" to init", "").split()
    lam = {k: float(v) for k, v in zip(words[::2], words[1::2])}
    want = torch.zeros((), dtype=torch.float64)
    if "l1" in lam:
        want = want + lam["l1"] * w.abs().sum()
    if "l2" in lam:
        want = want + lam["l2"] / 2 * ((w - w0.double()) if "to init" in term else w).square().sum()
    if "group_lasso" in lam:
        want = want + lam["group_lasso"] * torch.linalg.vector_norm(w, 2, dim=1).sum()
    if "orthogonal" in lam:
        want = want + lam["orthogonal"] * (w @ w.T - torch.eye(200, dtype=torch.float64)).square().sum()
    want.backward()
    assert model[1].weight.grad.dtype == torch.float64
    torch.testing.assert_close(model[1].weight.grad, w.grad, rtol=1e-12, atol=1e-15)


def test_a_loaded_reference_is_the_one_folded() -> None:
    model, reg, _ = setup(rules="layer fc2.weight l2 0.3 to init")
    saved = reg.state_dict()
    w0 = saved["references"]["fc2.weight"].clone()
    with torch.no_grad():
        model.fc2.weight.mul_(2)
    fresh = regdsl.parse("layer fc2.weight l2 0.3 to init").compile(model)  # its w₀ would be the doubled weight
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fresh.attach(opt, fold=True)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(folded_grads(model, opt)["fc2.weight"], 0.3 * (model.fc2.weight.detach() - w0))


def allocated_bytes(opt: torch.optim.Optimizer) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in "abcd":
            self.register_parameter(name, nn.Parameter(torch.randn(256, 512)))
        self.e = nn.Parameter(torch.randn(32, 1024))


def test_a_folded_step_allocates_only_what_the_math_needs() -> None:
    # Counted, not timed: after the first step, l1 and 'to init' reuse one scratch buffer and l2
    # adds in place; group_lasso needs its slice norms, orthogonal its 32x32 Gram matrix.
    model = Wide()
    rules = "layer a l1 0.01\nlayer b l2 0.1 to init\nlayer c l2 0.1\nlayer d group_lasso 0.01\nlayer e orthogonal 0.01"
    reg = regdsl.parse(rules).compile(model)
    plain, folded = (torch.optim.SGD(model.parameters(), lr=0.0, foreach=False) for _ in range(2))
    reg.attach(folded, fold=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    folded.step()  # warm up
    weights = sum(p.numel() * 4 for p in model.parameters())
    extra = allocated_bytes(folded) - allocated_bytes(plain)
    assert extra <= 32 * 32 * 4 + 16 * 256 * 4, (extra, weights)  # the Gram matrix, the norms and their kin
    assert extra < weights / 50


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fold_on_cuda_is_the_fold_on_cpu() -> None:
    results = {}
    for device in ("cpu", "cuda"):
        model, reg, _ = setup(rules=RULES + "layer fc1.bias l1 0.05\nall l2 0.01 warmup 2")
        model.to(device)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1, momentum=0.9)
        reg.attach(opt, fold=True)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3)).to(device)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results[device] = {n: p.detach().cpu() for n, p in model.named_parameters()}
    for name, value in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("few", [0, 3])
def test_large_and_small_tensors_of_one_term_fold_alike(few: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU a large tensor's sign(w) goes through the scratch buffer, small ones through one
    # _foreach batch (or a loop, in a bucket of at most FEW tensors): one rule covering them all
    # must give λ·sign(w) and λ·(w − w₀) everywhere.
    monkeypatch.setattr(fold_kernels, "FEW", few)
    model = Wide()
    model.f = nn.Parameter(torch.randn(3, 5))
    model.g = nn.Parameter(torch.randn(7))
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = regdsl.parse("layer a, f, g l1 0.01\nlayer b, e l2 0.1 to init").compile(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    got = folded_grads(model, opt)
    named = dict(model.named_parameters())
    want = {n: 0.01 * torch.sign(named[n].detach()) for n in "afg"}
    want |= {n: 0.1 * (named[n].detach() - w0[n]) for n in "be"}
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value)


@pytest.mark.parametrize("lam", [1e-4, 1e6])
def test_group_lasso_fold_at_a_zero_slice_and_a_nan(lam: float) -> None:
    # An all-zero slice gets 0 at any strength, never NaN; a NaN weight's slice stays NaN, as
    # autograd would make it on the loss path.
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight[0].zero_()
        model.weight[2, 1] = float("nan")
    reg = regdsl.parse(f"all group_lasso {lam}").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    grad = model.weight.grad
    w = model.weight.detach()
    assert torch.equal(grad[0], torch.zeros(4))
    torch.testing.assert_close(grad[1], lam * w[1] / w[1].norm())
    assert grad[2].isnan().all()


def same_shaped_stack(dim: int) -> nn.Module:
    """Five Linear(6, 6) (one run of same-shaped weights), then a Linear(6, 3); one all-zero slice."""
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)], nn.Linear(6, 3)).double()
    with torch.no_grad():
        (model[2].weight[1] if dim == 0 else model[2].weight[:, 1]).zero_()
    return model


def group_lasso_by_hand(model: nn.Module, lam: float, dim: int) -> dict[str, torch.Tensor]:
    want = {}
    for name, w in model.named_parameters():
        if name.endswith("weight"):
            norms = w.detach().pow(2).sum(dim=1 - dim, keepdim=True).sqrt()
            want[name] = torch.where(norms > 0, lam * w.detach() / norms, torch.zeros_like(w))
    return want


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_of_same_shaped_weights_takes_their_norms_in_one_stacked_kernel(dim: int) -> None:
    seeded(0)
    model = same_shaped_stack(dim)
    reg = regdsl.parse(f"all group_lasso 0.05 dim={dim}\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = folded_grads(model, opt)
    calls = collections.Counter(e.name for e in prof.events())
    assert calls["aten::stack"] == 1  # the five Linear(6, 6), not the last
    # Two norms (the stacked five, the last weight) into one buffer, one clamp of it, one add for all six.
    assert calls["aten::linalg_vector_norm"] == 2
    assert calls["aten::clamp_min_"] == 1
    assert calls["aten::_foreach_addcdiv_"] == 1
    want = group_lasso_by_hand(model, 0.05, dim)
    assert_grads({n: g for n, g in got.items()}, {n: w for n, w in want.items() if w.abs().sum() > 0})
    zero_slice = model[2].weight.grad[1] if dim == 0 else model[2].weight.grad[:, 1]
    assert torch.equal(zero_slice, torch.zeros(6, dtype=torch.float64))


def test_group_lasso_bucket_of_weights_and_biases_folds_each_by_its_own_formula() -> None:
    # One bucket holds the three weights (λ·w_i/‖w_i‖ per row, one norm buffer) and the three biases
    # (λ·sign(w), each element its own slice); one zero bias element adds 0.
    seeded(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[1].bias[0] = 0.0
    reg = regdsl.parse("all group_lasso 0.1").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    got = folded_grads(model, opt)
    want = {}
    for name, p in model.named_parameters():
        w = p.detach()
        want[name] = 0.1 * (w.sign() if w.ndim == 1 else w / w.pow(2).sum(dim=1, keepdim=True).sqrt())
    assert_grads(got, want)
    assert model[1].bias.grad[0] == 0.0


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_folds_a_large_weight_alone_and_batches_the_rest(dim: int) -> None:
    # On the CPU a weight of more than SMALL bytes gets its norms, their floor and its update one
    # after the other (while it is in cache); the small weights share one buffer, one clamp and one
    # _foreach_addcdiv_. An all-zero slice of the large weight adds 0.
    seeded(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 6), nn.Linear(6, 6), nn.Linear(6, 6)).double()
    assert model[0].weight.numel() * 8 > fold_kernels.SMALL >= model[1].weight.numel() * 8
    with torch.no_grad():
        (model[0].weight[3] if dim == 0 else model[0].weight[:, 3]).zero_()
    reg = regdsl.parse(f"all group_lasso 0.05 dim={dim}\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = folded_grads(model, opt)
    # Called by the fold itself, not by a _foreach kernel's per-tensor loop (the CPU's).
    calls = collections.Counter(e.name for e in prof.events() if e.cpu_parent is None or "_foreach" not in e.cpu_parent.name)
    assert calls["aten::addcdiv_"] == 1  # the large weight
    assert calls["aten::_foreach_addcdiv_"] == 1  # the three small ones
    assert calls["aten::clamp_min_"] == 2  # the large weight's norms, then the buffer
    assert calls["aten::linalg_vector_norm"] == 3  # the large, the 6x200, the two 6x6 stacked
    want = group_lasso_by_hand(model, 0.05, dim)
    assert_grads(got, want)
    zero_slice = model[0].weight.grad[3] if dim == 0 else model[0].weight.grad[:, 3]
    assert torch.equal(zero_slice, torch.zeros_like(zero_slice))


def test_a_step_with_no_backward_draws_no_missing_penalty_warning_on_the_loss_path() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt)
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # no backward: a penalty() would have changed nothing
    model(torch.ones(1, 6)).sum().backward()
    with pytest.warns(regdsl.RegDslWarning, match="no reg.penalty\\(\\) call"):
        opt.step()  # a backward without the penalty: still told


def test_a_step_with_no_backward_draws_no_missing_fold_warning_by_hand() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all l2 0.1").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1))
    reg.attach(opt, fold=True, fold_hook=False)
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # no backward, no reg.fold(): a skipped batch, as Lightning's callback leaves it
    model(torch.ones(1, 6)).sum().backward()
    with pytest.warns(regdsl.RegDslWarning, match="no reg.fold\\(\\) since the step before"):
        opt.step()  # a backward without the fold: still told


def test_an_optimizer_that_maximizes_is_refused_on_the_fold_path_and_warned_on_the_loss_path() -> None:
    # Before, both paths climbed the terms: with maximize=True, 'all l2 0.5' grew ‖w‖ from 0.93 to 1.35 in 20
    # steps where torch's weight_decay=0.5 (and the file's decay) shrank it to 0.18.
    model = MLP()
    reg = regdsl.parse("all l2 0.5").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    with pytest.raises(RegUsageError, match="maximize=True"):
        reg.attach(opt, fold=True)
    assert not opt._optimizer_step_pre_hooks  # refused before any hook
    with pytest.warns(regdsl.RegDslWarning, match=r"subtract reg.penalty\(\) from the objective"):
        reg.attach(opt)
    # Subtracted, as the warning says, the penalty shrinks the weights while the optimizer climbs the objective.
    before = model.fc1.weight.detach().norm()
    for _ in range(5):
        opt.zero_grad()
        (-reg.penalty()).backward()
        opt.step()
    assert model.fc1.weight.detach().norm() < before
