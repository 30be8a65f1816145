"""reg.values(): one 0-dim tensor per (term kind, rule line), on demand, without a host sync.

Every expected value is a plain formula written here on the model's own tensors (or,
for activity terms, on outputs the test captures with its own forward hooks), summed per
label by hand from the rule file. Nothing expected is read back from regdsl.
"""

from __future__ import annotations

import math

import pytest
import torch
from models import MLP, TinyTransformer, randomize
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl

MLP_RULES = """all decay 0.01 l2 0.1
exclude bias
layer fc2 l1 0.02 group_lasso 0.05 dim=1
layer head l2 0.3 to init
layer fc1 orthogonal 0.04 max_norm 2.0
layer fc1 activity l1 0.001
layer head.weight l1 0.5 prox
layer fc2 activity l2 0.002 warmup 4
"""

TRANSFORMER_RULES = """all l2 0.01
exclude norm; exclude bias
type Linear l1 0.003
layer blocks.0.mlp.** group_lasso 0.02
layer blocks.1.attn.in_proj_weight orthogonal 0.001
embedding l2 0.05 cosine to 0.01 over 10
layer blocks.1.mlp activity l2 0.004
"""


def _l2(w: torch.Tensor) -> torch.Tensor:
    return w.double().square().sum() / 2


def _l1(w: torch.Tensor) -> torch.Tensor:
    return w.double().abs().sum()


def _group_lasso(w: torch.Tensor, dim: int) -> torch.Tensor:
    w = w.double()
    return w.norm(dim=[d for d in range(w.ndim) if d != dim % w.ndim]).sum()


def _orthogonal(w: torch.Tensor) -> torch.Tensor:
    m = w.double().reshape(w.shape[0], -1)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return (gram - torch.eye(gram.shape[0], dtype=torch.float64)).square().sum()


def _capture(model: nn.Module, names: list[str]) -> tuple[dict[str, list[torch.Tensor]], list]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append(out.detach())) for n in names]
    return seen, handles


def _mlp_expected(model: MLP, w0: torch.Tensor, outputs: dict[str, list[torch.Tensor]], t: int) -> dict[str, torch.Tensor]:
    fc1, fc2, head = model.fc1.weight, model.fc2.weight, model.head.weight
    batch = outputs["fc1"][0].shape[0]
    return {
        # line 1: l2 0.1 on fc1.weight and fc2.weight (head's l2 is overridden by line 4; biases excluded)
        "l2:1": 0.1 * (_l2(fc1) + _l2(fc2)),
        "l1:3": 0.02 * _l1(fc2),
        "group_lasso:3": 0.05 * _group_lasso(fc2, 1),
        "l2:4": 0.3 * _l2(head.double() - w0.double()),
        "orthogonal:5": 0.04 * _orthogonal(fc1),
        "activity_l1:6": sum(0.001 * _l1(a) / batch for a in outputs["fc1"]),
        "activity_l2:8": sum(0.002 * min(t / 4, 1.0) * _l2(a) / batch for a in outputs["fc2"]),
    }  # no label for decay (line 1), max_norm (line 5) or l1 ... prox (line 7): no loss terms


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-9)


def _assert_values(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)  # in the order of the rule lines
    for key, value in got.items():
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad, key
        torch.testing.assert_close(value.double(), expected[key].double(), rtol=1e-5, atol=1e-9, msg=key)


def test_mlp_values_per_label_against_plain_formulas() -> None:
    model = randomize(MLP())
    reg = regdsl.parse(MLP_RULES).compile(model)
    w0 = model.head.weight.detach().clone()
    opt = torch.optim.SGD(reg.param_groups(lr=0.05), lr=0.05)
    reg.attach(opt)
    outputs, handles = _capture(model, ["fc1", "fc2"])
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for t in range(3):
        for seen in outputs.values():
            seen.clear()
        loss = model(x).square().mean()
        values = reg.values()  # before penalty(): the activity values it is about to take
        _assert_values(values, _mlp_expected(model, w0, outputs, t))
        penalty = reg.penalty()
        torch.testing.assert_close(sum(values.values()), penalty.detach(), rtol=1e-5, atol=1e-9)
        _assert_values(reg.values(), _mlp_expected(model, w0, outputs, t))  # after: still this pass's
        opt.zero_grad()
        (loss + penalty).backward()
        opt.step()
    for h in handles:
        h.remove()


def test_transformer_values_sum_to_the_penalty() -> None:
    model = randomize(TinyTransformer())
    reg = regdsl.parse(TRANSFORMER_RULES).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.01), lr=0.01)
    reg.attach(opt)
    outputs, handles = _capture(model, ["blocks.1.mlp"])
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    for t in range(3):
        outputs["blocks.1.mlp"].clear()
        loss = model(ids).square().mean()
        values = reg.values()
        embed = 0.01 + (0.05 - 0.01) * (1 + math.cos(math.pi * t / 10)) / 2
        linears = [
            *(b.attn.out_proj.weight for b in model.blocks),
            *(b.mlp[i].weight for b in model.blocks for i in (0, 2)),
            model.embed.weight,  # lm_head is a Linear tied to the embedding: type Linear reaches it
        ]
        l2_all = [model.pos_embed, *(b.attn.in_proj_weight for b in model.blocks), *linears[:-1]]
        group = [model.blocks[0].mlp[0].weight, model.blocks[0].mlp[2].weight]
        expected = {
            "l2:1": 0.01 * sum(_l2(w) for w in l2_all),
            "l1:3": 0.003 * sum(_l1(w) for w in linears),
            "group_lasso:4": 0.02 * sum(_group_lasso(w, 0) for w in group),
            "orthogonal:5": 0.001 * _orthogonal(model.blocks[1].attn.in_proj_weight),
            "l2:6": embed * _l2(model.embed.weight),
            "activity_l2:7": 0.004 * _l2(outputs["blocks.1.mlp"][0]) / 2,
        }
        _assert_values(values, expected)
        penalty = reg.penalty()
        torch.testing.assert_close(sum(values.values()), penalty.detach(), rtol=1e-5, atol=1e-9)
        opt.zero_grad()
        (loss + penalty).backward()
        opt.step()
    for h in handles:
        h.remove()


def test_values_are_tensors_computed_without_a_host_sync() -> None:
    model = randomize(MLP())
    reg = regdsl.parse(MLP_RULES).compile(model)
    model(torch.randn(3, 6))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        values = reg.values()
    ops = {e.name for e in prof.events()}
    assert "aten::item" not in ops and "aten::_local_scalar_dense" not in ops, sorted(ops)
    assert values and all(isinstance(v, torch.Tensor) and v.shape == () for v in values.values())


def test_values_report_folded_terms_too() -> None:
    model = randomize(MLP())
    reg = regdsl.parse("all l2 0.1 l1 0.01\nexclude bias\nlayer fc2 group_lasso 0.05\n").compile(model)
    unfolded = reg.values()
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=True)
    assert float(reg.penalty()) == 0.0  # everything is folded: the loss path has nothing left
    folded = reg.values()
    assert list(folded) == ["l2:1", "l1:1", "group_lasso:3"]
    for key in unfolded:
        torch.testing.assert_close(folded[key], unfolded[key], rtol=0, atol=0)
    _close(folded["l1:1"], 0.01 * sum(_l1(m.weight) for m in (model.fc1, model.fc2, model.head)))


def test_activity_values_follow_the_latest_forward_pass() -> None:
    model = randomize(MLP())
    reg = regdsl.parse("layer fc1 activity l1 0.1\nlayer fc2 l2 0.5\n").compile(model)
    assert list(reg.values()) == ["l2:2"]  # no forward pass yet: no activity value to report
    x1, x2 = torch.ones(2, 6), -2 * torch.ones(4, 6)
    with torch.no_grad():
        model(x1)  # an evaluation pass collects nothing
    assert list(reg.values()) == ["l2:2"]

    def expected(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # else the hook would collect this pass too
            return 0.1 * _l1(model.fc1(x)) / x.shape[0]

    model(x1)
    _close(reg.values()["activity_l1:1"], expected(x1))
    reg.penalty()
    _close(reg.values()["activity_l1:1"], expected(x1))  # taken, still reported
    model(x2)  # a new pass replaces the taken one
    _close(reg.values()["activity_l1:1"], expected(x2))
    model(x1)  # two passes before one penalty(): penalty() will take both
    both = reg.values()["activity_l1:1"]
    _close(both, expected(x2) + expected(x1))
    _close(reg.penalty().detach(), both + reg.values()["l2:2"])


def test_values_follow_the_schedule_and_skip_terms_that_are_always_zero() -> None:
    model = randomize(MLP())
    reg = regdsl.parse("all l2 0.2 warmup 4\nlayer fc1 l1 0\nexclude bias\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.0), lr=0.0)  # lr 0: the weights stay put
    reg.attach(opt)
    total = sum(_l2(m.weight) for m in (model.fc1, model.fc2, model.head))
    for t in range(6):
        values = reg.values()
        assert list(values) == ["l2:1"]  # 'l1 0' is no term at any step
        _close(values["l2:1"], 0.2 * min(t / 4, 1.0) * total)
        opt.step()


def test_values_of_a_model_without_loss_terms_is_empty() -> None:
    model = MLP()
    reg = regdsl.parse("all decay 0.1\nlayer head max_norm 1.0\n").compile(model)
    assert reg.values() == {}


def test_values_keep_float64_for_float64_parameters() -> None:
    model = randomize(MLP()).double()
    reg = regdsl.parse("all l2 0.1 l1 0.2\n").compile(model)
    values = reg.values()
    assert {v.dtype for v in values.values()} == {torch.float64}
    torch.testing.assert_close(values["l1:1"], 0.2 * sum(_l1(p) for p in model.parameters()), rtol=1e-12, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_values_stay_on_the_gpu_without_a_sync() -> None:
    model = randomize(MLP()).cuda()
    reg = regdsl.parse(MLP_RULES).compile(model)
    model(torch.randn(3, 6, device="cuda"))
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        values = reg.values()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in values.values())


def test_activity_values_no_penalty_took_leave_values_when_the_step_drops_them() -> None:
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = regdsl.parse("layer 0 activity l2 1").compile(model)
    reg.attach(opt)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    model(x1)
    model(x2)
    # Two passes since the last penalty(): their values, summed (l2: 1/2 · sum a² / batch, each).
    with torch.no_grad():  # the reference's own calls of the module must not collect
        want = sum(0.5 * model[0](x).double().square().sum() / 3 for x in (x1, x2))
    torch.testing.assert_close(reg.values()["activity_l2:1"].double(), want)
    model(x1).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)  # the step says they were never added to a loss
        opt.step()
    # Before, values() went on reporting what the step had dropped, while the next penalty() was 0.
    assert "activity_l2:1" not in reg.values()
    assert float(reg.penalty()) == 0.0
