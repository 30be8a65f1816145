"""What penalty() allocates, counted with torch.profiler: never a wall-clock time.

On CPU, memory freed after a step goes back to the OS and every full-size temporary
page-faults it in again on the next step, so what the loss path allocates is its cost
(/work/shared/notes/speed.md). The backward of ``l1``, ``l2`` and ``l2 ... to`` must
allocate exactly one tensor per parameter, the gradient autograd is handed (elastic net
on one tensor included), and the forward at most one temporary at a time, freed at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import regdsl
from regdsl import penalties


@pytest.fixture(autouse=True)
def _closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    # These counts are the closed-form Function's contract. A bucket of at most penalties.FEW
    # tensors of at most 64 KiB (this model's) is plain autograd ops instead, whose temporaries
    # are that small: test_few_small_tensors_allocate_only_small_temporaries below.
    monkeypatch.setattr(penalties, "FEW", 0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Weights of 20 KiB and more; biases, strengths and sums are far smaller.
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 40))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith("weight")]


def _record(fn: Callable[[], object]) -> tuple[list[int], Counter[str]]:
    """Every allocation (+bytes) and free (-bytes) in time order, and the aten ops called from
    Python (an op's own inner calls not counted again)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    memory = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    ops = Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    return [e.nbytes() for e in memory], ops


def _large(events: list[int], smallest: int) -> list[int]:
    return [n for n in events if abs(n) >= smallest]


def _most_alive(events: list[int]) -> int:
    alive = most = 0
    for n in events:
        alive += 1 if n > 0 else -1
        most = max(most, alive)
    return most


RULES = {
    "l1": "all l1 1e-3\nexclude bias",
    "l2": "all l2 1e-2\nexclude bias",
    "elastic net": "all l1 1e-3 l2 1e-2\nexclude bias",
    "l2 to init": "all l2 1e-2 to init\nexclude bias",
}


@pytest.mark.parametrize("rules", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("grad_exists", [False, True], ids=["first-backward", "accumulating"])
def test_backward_allocates_one_gradient_per_parameter(rules: str, grad_exists: bool) -> None:
    model = _model()
    reg = regdsl.parse(rules).compile(model)
    weights = _weights(model)
    if grad_exists:
        reg.penalty().backward()  # later backwards add into .grad in place
    with torch.no_grad():
        model[0].weight.add_(0.01)  # nonzero (w − w₀) for 'to init'
    penalty = reg.penalty()
    events, ops = _record(penalty.backward)
    smallest = min(w.numel() * w.element_size() for w in weights)
    allocations = sorted(n for n in _large(events, smallest) if n > 0)
    assert allocations == sorted(w.numel() * w.element_size() for w in weights)
    assert not [op for op in ops if "foreach" in op or op == "aten::cat"], ops


def test_elastic_net_gradient_is_three_kernels_per_parameter() -> None:
    model = _model()
    reg = regdsl.parse(RULES["elastic net"]).compile(model)
    penalty = reg.penalty()
    _, ops = _record(penalty.backward)
    n = len(_weights(model))
    # sign(w), scaled in place by λ1, then + λ2·w in place: one output, no other full-size op.
    assert (ops["aten::sign"], ops["aten::mul_"], ops["aten::addcmul_"]) == (n, n, n), ops
    assert ops["aten::mul"] + ops["aten::add"] + ops["aten::sgn"] <= 1, ops  # the strengths times the incoming grad


@pytest.mark.parametrize("rules", RULES.values(), ids=RULES.keys())
def test_forward_holds_at_most_one_temporary_at_a_time(rules: str) -> None:
    model = _model()
    reg = regdsl.parse(rules).compile(model)
    with torch.no_grad():
        model[0].weight.add_(0.01)
    weights = _weights(model)
    smallest = min(w.numel() * w.element_size() for w in weights)
    events, ops = _record(reg.penalty)
    large = _large(events, smallest)
    assert len([n for n in large if n > 0]) <= len(weights)  # |w| for l1, w − w₀ for 'to init'
    assert _most_alive(large) <= 1 and sum(large) == 0  # each freed before the next, none kept
    assert not [op for op in ops if "foreach" in op or "norm" in op or op == "aten::cat"], ops


def test_forward_and_backward_together_hold_no_more_than_the_gradients_and_one_temporary() -> None:
    model = _model()
    reg = regdsl.parse(RULES["elastic net"]).compile(model)
    weights = _weights(model)
    smallest = min(w.numel() * w.element_size() for w in weights)
    events, _ = _record(lambda: reg.penalty().backward())
    assert _most_alive(_large(events, smallest)) <= len(weights)


def test_a_large_weight_is_summed_in_slices_that_stay_small() -> None:
    # 4M elements (16 MiB): no temporary of the forward may come near its size.
    big = nn.Linear(2048, 2048, bias=False)
    reg = regdsl.parse("all l1 1e-5 l2 1e-4").compile(big)
    events, _ = _record(reg.penalty)
    assert events and max(events) <= (1 << 20)  # 1 MiB slices
    penalty = reg.penalty()
    events, _ = _record(penalty.backward)
    assert [n for n in events if n > (1 << 20)] == [big.weight.numel() * 4]  # the gradient, and only it


def test_few_small_tensors_allocate_only_small_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(penalties, "FEW", 3)
    model = _model()  # 3 weights of 20 to 64 KiB: plain autograd ops
    reg = regdsl.parse(RULES["elastic net"]).compile(model)
    largest = max(w.numel() * w.element_size() for w in _weights(model))
    assert largest <= penalties.SMALL
    events, ops = _record(lambda: reg.penalty().backward())
    assert max(events) <= largest and ops["aten::abs"] == 3, ops
    # A weight over 64 KiB takes the whole bucket to the closed-form Function, whose backward
    # allocates each gradient and nothing else of that size.
    big = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(256, 256, bias=False))
    reg = regdsl.parse(RULES["elastic net"]).compile(big)
    penalty = reg.penalty()
    events, ops = _record(penalty.backward)
    assert ops["aten::abs"] == 0 and ops["aten::sign"] == 2, ops
    assert [n for n in events if n > (1 << 10)] == [256 * 256 * 4]
