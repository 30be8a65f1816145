"""DistributedDataParallel parity (gloo, two processes on the CPU): every term kind, on the loss
path and the fold path, with each DDP setting docs/distributed.md documents, gives the weights
one process gets training on the whole batch (float64, within 1e-9).

The single-process runs are themselves checked against hand-written references elsewhere
(tests/test_fold.py, tests/test_training.py); here the weight of the layer the forward never
calls is also checked against its formula, written out below.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_workers import LR, STEPS, net, train, worker

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

FIND_UNUSED = {"find_unused_parameters": True}
DEFAULT: dict = {}
STATIC = {"static_graph": True}

# (path, DDP settings, micro-batches per step, a weight frozen and unfrozen by turns). The fold
# path adds the terms after backward, so a layer the forward never calls is unused to DDP, as in
# any model: it needs find_unused_parameters=True or static_graph=True (the default settings fail
# in DDP itself). Under find_unused_parameters the loss path's terms go through stand-ins of the
# weights (regdsl.ddp): they follow requires_grad too.
RUNS = [
    ("loss", FIND_UNUSED, 1, False),
    ("loss", DEFAULT, 1, False),
    ("loss", STATIC, 1, False),
    ("fold", FIND_UNUSED, 1, False),
    ("fold", STATIC, 1, False),
    ("loss", FIND_UNUSED, 2, False),
    ("fold", FIND_UNUSED, 2, False),
    ("loss", FIND_UNUSED, 1, True),
    ("fold", FIND_UNUSED, 1, True),
]


@pytest.fixture(scope="module")
def ranks() -> list[list]:
    """Every run, on each of two ranks: spawned once for the module (process start is the cost)."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'rendezvous'}"
        mp.spawn(worker, args=(2, init, tmp, RUNS), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def unused_reference() -> torch.Tensor:
    """``unused.weight`` by hand: its only gradient is ``0.2·w`` (l2) and SGD's ``0.02·w`` decay
    (warmup over 2 steps), with momentum 0.9."""
    w = net().unused.weight.detach().clone()
    buf = torch.zeros_like(w)
    for t in range(STEPS):
        g = 0.2 * w + 0.02 * min(t / 2, 1.0) * w
        buf = g if t == 0 else 0.9 * buf + g
        w = w - LR * buf
    return w


@pytest.mark.parametrize(
    "index", range(len(RUNS)), ids=[f"{p}-{s or 'default'}-micro{m}{'-toggled' * t}" for p, s, m, t in RUNS]
)
def test_two_processes_match_one_on_the_whole_batch(ranks: list[list], index: int) -> None:
    path, _, micro, toggle = RUNS[index]
    got = [ranks[r][index] for r in range(2)]
    for result in got:
        assert not isinstance(result, str), result
    expected = train(path, None, micro, toggle)
    for name, want in expected.items():
        for rank in range(2):
            torch.testing.assert_close(got[rank][name], want, rtol=0, atol=1e-9, msg=f"{name} on rank {rank}")
    torch.testing.assert_close(expected["unused.weight"], unused_reference(), rtol=0, atol=1e-12)
    before = dict(net().named_parameters())
    assert all(not torch.equal(before[n], expected[n]) for n in expected)  # every tensor trained


def test_the_loss_and_fold_paths_agree() -> None:
    loss, fold = train("loss"), train("fold")
    for name in loss:
        torch.testing.assert_close(fold[name], loss[name], rtol=0, atol=1e-12, msg=name)
