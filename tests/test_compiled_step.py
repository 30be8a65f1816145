"""``reg.compiled_step(opt)``: the folded terms inside the optimizer update's own compiled graph.

The weights are checked against a reference written out here (the terms' gradients by hand,
then the same optimizer's step compiled as ``torch.compile(opt.step)``), the graph structure by dynamo's counters, and the step's hooks by
counting their calls.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, seeded
from torch._dynamo.utils import counters

import regdsl
from regdsl import RegUsageError

ELASTIC = "layer fc1.weight l1 0.05 l2 0.1\nlayer fc2.weight l2 0.2 to init\n"
EVERY_TERM = ELASTIC + "layer fc2.weight group_lasso 0.05\nlayer head.weight orthogonal 0.02\n"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def by_hand(model: MLP, init: dict[str, torch.Tensor], group_lasso: bool) -> None:
    """The terms of EVERY_TERM (ELASTIC alone without ``group_lasso``) added to the gradients."""
    w1, w2, w3 = model.fc1.weight, model.fc2.weight, model.head.weight
    w1.grad += 0.05 * torch.sign(w1) + 0.1 * w1
    w2.grad += 0.2 * (w2 - init["fc2.weight"])
    if group_lasso:
        w2.grad += 0.05 * w2 / w2.norm(dim=1, keepdim=True)
        gram = w3 @ w3.T - torch.eye(w3.shape[0], dtype=w3.dtype)
        w3.grad += 4 * 0.02 * gram @ w3


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.0),
}


@pytest.mark.parametrize("rules", [ELASTIC, EVERY_TERM], ids=["elastic", "every term"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_matches_the_terms_written_by_hand(rules: str, name: str) -> None:
    seeded(0)
    model = MLP().double()
    reference = MLP().double()
    reference.load_state_dict(model.state_dict())
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = regdsl.parse(rules).compile(model)
    opt = OPTIMIZERS[name](model.parameters())
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    ref_opt = OPTIMIZERS[name](reference.parameters())
    # torch's own compiled step: compiled Adam's float32 step count moves float64 weights by ~1e-7 from eager's.
    ref_opt.step = torch.compile(ref_opt.step)
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(4):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
        with torch.no_grad():
            by_hand(reference, init, group_lasso=rules == EVERY_TERM)
        opt.step()
        ref_opt.step()
    assert reg.step == 4
    for (n, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_a_second_compiled_step_with_more_param_groups_compiles_afresh() -> None:
    """Each compiled step has a graph cache of its own. Shared between optimizers in one process, a
    step of SGD with momentum whose optimizer has more param groups than one compiled before failed
    to compile (torch 2.13's dynamo: SpeculationLogDivergence)."""
    seeded(0)
    for rules in ("all l2 0.1", "all l2 0.1\nall decay 0.01\nexclude bias"):  # one group, then two
        model = MLP().double()
        reference = MLP().double()
        reference.load_state_dict(model.state_dict())
        reg = regdsl.parse(rules).compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.05), lr=0.05, momentum=0.9)
        reg.attach(opt, fold=True)
        opt.step = reg.compiled_step(opt)
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        ref_opt = torch.optim.SGD(
            [{"params": [p], "weight_decay": decay[id(q)]} for p, q in zip(reference.parameters(), model.parameters())],
            lr=0.05,
            momentum=0.9,
        )
        x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            for m, o in ((model, opt), (reference, ref_opt)):
                o.zero_grad()
                m(x).square().mean().backward()
            with torch.no_grad():
                for n, p in reference.named_parameters():
                    if rules == "all l2 0.1" or not n.endswith("bias"):
                        p.grad += 0.1 * p
            opt.step()
            ref_opt.step()
        assert len(opt.param_groups) == (1 if rules == "all l2 0.1" else 2)
        for (n, got), want in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_the_fold_and_the_update_are_one_graph() -> None:
    """torch.compile(opt.step) makes the fold a graph of its own; compiled_step does not."""
    seeded(0)
    model = CNN()
    reg = regdsl.parse("all l1 1e-3 l2 1e-3\nexclude bias\nexclude norm\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize(
    "rules, per_layer",
    [  # each layer's weight and bias are the optimizer's: an identity check each
        ("all group_lasso 0.01\nexclude bias\n", {"ID_MATCH": 2, "TENSOR_MATCH": 1}),  # the weight's gradient
        ("all l1 0.01 l2 0.02\n", {"ID_MATCH": 2, "TENSOR_MATCH": 2}),  # both gradients
        ("all l2 0.01 to init\nexclude bias\n", {"ID_MATCH": 2, "TENSOR_MATCH": 2}),  # the gradient, the reference
    ],
    ids=["group_lasso", "elastic", "l2 to init"],
)
def test_the_guards_grow_by_one_identity_check_per_weight(rules: str, per_layer: dict[str, int]) -> None:
    """Dynamo checks its guards before every call of the graph. Each weight adds one identity check
    (weights are static, as torch's compiled optimizers make them, not a full tensor check) and one
    tensor check per other tensor the fold reads: no check of the plan's layout (each weight's
    offset in the norm buffer and its shape), which cost 0.2 ms a step on the 400-layer MLP."""

    def guard_counts(layers: int) -> dict[str, int]:
        model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(layers)])
        reg = regdsl.parse(rules).compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
        reg.attach(opt, fold=True)
        seen: list[Any] = []

        def keep_all(entries: list[Any]) -> list[bool]:
            seen.extend(entries)
            return [True] * len(entries)

        opt.step = reg.compiled_step(opt, options={"guard_filter_fn": keep_all})
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
        return Counter(e.guard_type for e in seen)

    seeded(0)
    few, many = guard_counts(3), guard_counts(12)
    for kind in ("ID_MATCH", "TENSOR_MATCH", "CONSTANT_MATCH", "EQUALS_MATCH", "SEQUENCE_LENGTH"):
        assert many[kind] - few[kind] == 9 * per_layer.get(kind, 0), kind


def test_the_step_runs_every_hook_once_and_counts() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse(ELASTIC).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    reg.attach(opt, fold=True)
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step = reg.compiled_step(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
    assert calls == ["pre", "post"] * 3
    assert reg.step == 3


def test_a_parameter_without_gradient_gets_the_term_alone() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("layer fc1.weight l2 0.5\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    before = model.fc1.weight.detach().clone()
    opt.step()  # no backward: fc1.weight's gradient is the term's
    torch.testing.assert_close(model.fc1.weight.detach(), before - 0.1 * 0.5 * before)


@pytest.mark.parametrize("rules", ["all l2 0.5\n", "all group_lasso 0.1\n"])
def test_a_weight_frozen_after_the_first_compiled_step_gets_no_term(rules: str) -> None:
    # Before, the graph kept the requires_grad it was traced with (the weights are guarded by identity
    # alone): a weight frozen later went on getting the term, moved by lr·λ·w each step.
    seeded(0)
    model = MLP()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    x = torch.randn(5, 6)

    def step() -> None:
        opt.zero_grad(set_to_none=False)  # the frozen weight keeps a zero gradient, which SGD steps
        model(x).sum().backward()
        opt.step()

    step()
    model.fc2.weight.requires_grad_(False)
    frozen = model.fc2.weight.detach().clone()
    step()
    assert torch.equal(model.fc2.weight.detach(), frozen)
    model.fc2.weight.requires_grad_(True)  # trainable again: the term is back
    step()
    assert not torch.equal(model.fc2.weight.detach(), frozen)
    # Frozen and unfrozen again and again (a phase of each): the two graphs are taken up, none is compiled anew.
    counters.clear()
    for trainable in (False, True, False, True):
        model.fc2.weight.requires_grad_(trainable)
        before = model.fc2.weight.detach().clone()
        step()
        assert torch.equal(model.fc2.weight.detach(), before) != trainable
    assert counters["stats"]["unique_graphs"] == 0


def test_compiled_step_refuses_what_it_cannot_do() -> None:
    model = MLP()
    reg = regdsl.parse(ELASTIC).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    with pytest.raises(RegUsageError, match="needs attach"):
        reg.compiled_step(opt)
    reg.attach(opt)
    with pytest.raises(RegUsageError, match="fold=True"):
        reg.compiled_step(opt)
    reg.detach()
    reg.attach(opt, fold=True, fold_hook=False)
    with pytest.raises(RegUsageError, match="fold_hook=False"):
        reg.compiled_step(opt)
    reg.detach()
    reg.attach(opt, fold=True)
    step = reg.compiled_step(opt)
    with pytest.raises(RegUsageError, match="closure"):
        step(lambda: 0.0)
    assert reg.step == 0


def test_several_optimizers_each_get_their_own_step() -> None:
    seeded(0)
    model = MLP()
    reference = MLP()
    reference.load_state_dict(model.state_dict())
    reg = regdsl.parse("layer fc1.weight l2 0.5\nlayer head.weight l1 0.1\n").compile(model)
    opt_a = torch.optim.SGD(reg.param_groups(of=model.fc1, lr=0.1), lr=0.1)
    opt_b = torch.optim.SGD(reg.param_groups(of=[*model.fc2.parameters(), *model.head.parameters()], lr=0.1), lr=0.1)
    reg.attach([opt_a, opt_b], fold=True)
    with pytest.raises(RegUsageError, match="pass the one"):
        reg.compiled_step()
    opt_a.step = reg.compiled_step(opt_a)
    x = torch.randn(8, 6)
    model(x).sum().backward()
    reference(x).sum().backward()
    opt_a.step()  # fc1 alone, with its term; head's term waits for opt_b's step
    with torch.no_grad():
        reference.fc1.weight -= 0.1 * (reference.fc1.weight.grad + 0.5 * reference.fc1.weight)
        reference.fc1.bias -= 0.1 * reference.fc1.bias.grad
    for (n, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg=lambda m, n=n: f"{n}: {m}")
    assert reg.step == 1


def test_after_detach_the_compiled_step_refuses_to_fold_again() -> None:
    model = MLP()
    reg = regdsl.parse(ELASTIC).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    reg.detach()  # penalty() is whole again: folding too would count every term twice
    model(torch.randn(2, 6)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RegUsageError, match="detached"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    del opt.step  # the optimizer's own step again
    opt.step()
    assert not torch.equal(model.fc1.weight, before[0])


def test_an_lr_scheduler_built_afterwards_wraps_the_compiled_step() -> None:
    """Schedulers wrap opt.step through its __func__ to check the call order; lr is a tensor so
    the scheduler's moves do not recompile."""
    seeded(0)
    model = MLP()
    reference = MLP()
    reference.load_state_dict(model.state_dict())
    reg = regdsl.parse("layer fc1.weight l2 0.5\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=torch.tensor(0.1)), lr=torch.tensor(0.1))
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 6)
    for step in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        reference.zero_grad()
        reference(x).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "optimizer.step() has been overridden" warning
            opt.step()
            scheduler.step()
        with torch.no_grad():
            lr = 0.1 * 0.5**step
            for name, q in reference.named_parameters():
                q -= lr * (q.grad + 0.5 * q if name == "fc1.weight" else q.grad)
    for (n, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_slices_of_a_cnn_match_by_hand(dim: int) -> None:
    """Conv filters (4-D) and a Linear grouped along ``dim``; with dim=0 the 1-D BatchNorm weights too
    (each element a slice; dim=1 does not exist for them, RD104)."""
    seeded(0)
    model = CNN().double()
    reference = CNN().double()
    reference.load_state_dict(model.state_dict())
    rules = f"all group_lasso 0.05 dim={dim}\nexclude bias\n" + ("exclude norm\n" if dim else "")
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.05), lr=0.05, momentum=0.9)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            for name, w in reference.named_parameters():
                if name.endswith("bias") or (dim and w.ndim == 1):
                    continue
                if w.ndim == 1:  # each element its own slice
                    w.grad += 0.05 * torch.sign(w)
                else:
                    others = tuple(d for d in range(w.ndim) if d != dim)
                    w.grad += 0.05 * w / w.pow(2).sum(dim=others, keepdim=True).sqrt()
        opt.step()
        ref_opt.step()
    for (n, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("dim", [0, 1])
def test_group_lasso_of_same_shaped_weights_stacked_for_their_norms(dim: int) -> None:
    """Five Linear(6, 6) take their slice norms from one stacked copy, before the graph."""
    seeded(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(5)], torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        (model[2].weight[1] if dim == 0 else model[2].weight[:, 1]).zero_()
    reg = regdsl.parse(f"all group_lasso 0.05 dim={dim}\nexclude bias").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reg.attach(opt, fold=True)
    opt.step = reg.compiled_step(opt)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for _ in range(2):  # the second step reuses the norm buffer
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    for name, w in model.named_parameters():
        want = grads[name].clone()
        if name.endswith("weight"):
            norms = w.detach().pow(2).sum(dim=1 - dim, keepdim=True).sqrt()
            want += torch.where(norms > 0, 0.05 * w.detach() / norms, torch.zeros_like(w))
        torch.testing.assert_close(w.grad, want, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")


def test_the_compiled_step_keeps_its_regularizer() -> None:
    """Dropped by the caller, the regularizer stays while its compiled step is the optimizer's: its
    hooks keep counting steps and moving the schedules the graph folds with."""

    def build() -> tuple[MLP, torch.optim.Optimizer, Any]:
        model = MLP()
        reg = regdsl.parse("layer fc1.weight l2 0.1 warmup 3").compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.1), lr=0.1)
        reg.attach(opt, fold=True)
        opt.step = reg.compiled_step(opt)
        return model, opt, weakref.ref(reg)

    seeded(0)
    model, opt, reg = build()
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
    assert reg() is not None and reg().step == 2
    assert not [w for w in caught if issubclass(w.category, regdsl.RegDslWarning)]
