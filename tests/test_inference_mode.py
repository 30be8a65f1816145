"""Calls made inside ``torch.inference_mode()`` (a validation step: Lightning's trainer.validate and test run in it) leave
training as it would have been. They may build what later training steps use (buckets rebuilt after
``model.to(...)``, a moved ``w0``, the zero a folded file's ``penalty()`` keeps), and a tensor made
in inference mode can neither be saved for backward nor have its version read: that broke the next
training step with a raw RuntimeError.

The reference is the same run with every validation call made under ``torch.no_grad()`` instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import regdsl

RULES = {
    "to init": "all l2 0.1 to init",
    "elastic net": "all l1 0.01 l2 0.1\nexclude bias",
    "group_lasso": "all group_lasso 0.05\nexclude bias",
    "orthogonal": "all orthogonal 0.01\nexclude bias",
    "activity": "layer 0 activity l2 0.1\nall l2 0.1",
}


def train(rules: str, fold: bool, cast: bool, where: str, mode: type) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Three steps; before each, a validation forward (and ``where``'s calls) under ``mode``. ``where``:
    "compile" (the regularizer is compiled in that mode), "penalty" or "values"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with mode() if where == "compile" else torch.enable_grad():
        reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=fold)
    if cast:
        model.double()  # followed after compile, references included
    dtype = torch.float64 if cast else torch.float32
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    seen = []
    for _ in range(3):
        with mode():
            validation = model(x).square().mean()
            if where == "penalty":
                seen.append(float(validation + reg.penalty()))
            elif where == "values":
                seen.append(float(sum(reg.values().values())))
        opt.zero_grad()
        (model(x).square().mean() + reg.penalty()).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, seen


@pytest.mark.parametrize("where", ["compile", "penalty", "values"])
@pytest.mark.parametrize("cast", [False, True], ids=["as compiled", "cast after compile"])
@pytest.mark.parametrize("fold", [False, True], ids=["loss path", "fold"])
@pytest.mark.parametrize("rules", list(RULES.values()), ids=list(RULES))
def test_calls_inside_inference_mode_leave_training_as_it_was(rules: str, fold: bool, cast: bool, where: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a validation forward's activity values are not collected: no_grad
        got, got_seen = train(rules, fold, cast, where, torch.inference_mode)
        want, want_seen = train(rules, fold, cast, where, torch.no_grad)
    assert got_seen == want_seen
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_penalty_inside_inference_mode_is_an_ordinary_tensor_without_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    reg = regdsl.parse("all l2 0.1").compile(model)
    with torch.inference_mode():
        value = reg.penalty()
    want = 0.05 * sum(float(p.detach().square().sum()) for p in model.parameters())
    assert not value.is_inference() and not value.requires_grad
    assert float(value) == pytest.approx(want, rel=1e-6)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("fold", [False, True], ids=["loss path", "fold"])
def test_penalty_in_a_compiled_loss_reads_no_mode_and_breaks_no_graph(fold: bool) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    reg = regdsl.parse("all l1 0.01 l2 0.1\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=fold)

    @torch.compile(backend="eager")
    def loss(x: torch.Tensor) -> torch.Tensor:
        return model(x).square().mean() + reg.penalty()

    for _ in range(2):
        opt.zero_grad()
        loss(torch.randn(8, 4)).backward()
        opt.step()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
