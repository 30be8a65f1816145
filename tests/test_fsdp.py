"""FSDP2 (``fully_shard``) parity, gloo, two processes on the CPU: every term kind on the loss path
and the fold path gives the weights of one unsharded process on the whole batch (float64,
within 1e-9); ``penalty()`` is a plain tensor a loss can be added to, with the unsharded value;
``explain`` shows unsharded shapes. A placement regdsl cannot read is a compile error.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

RUNS = ["loss", "fold", "loss-hsdp", "fold-hsdp", "partial", "stale", "refs"]
TRAINING = RUNS[:4]


@pytest.fixture(scope="module")
def ranks() -> list[list]:
    from fsdp_workers import worker

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, f"file://{Path(tmp) / 'rendezvous'}", tmp, RUNS), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("index", range(len(TRAINING)), ids=TRAINING)
def test_sharded_training_matches_one_process(ranks: list[list], index: int) -> None:
    from fsdp_workers import train

    got = [ranks[r][index] for r in range(2)]
    for result in got:
        assert not isinstance(result, str), result
    want = train(RUNS[index].removesuffix("-hsdp"), sharded=False)
    for rank in range(2):
        for name, w in want["weights"].items():
            torch.testing.assert_close(got[rank]["weights"][name], w, rtol=0, atol=1e-9, msg=f"{name} on rank {rank}")
        torch.testing.assert_close(got[rank]["penalty"], want["penalty"], rtol=1e-12, atol=0)
        assert got[rank]["values"].keys() == want["values"].keys()
        for label, value in want["values"].items():
            if label.startswith("activity"):
                continue  # the last forward's: a rank saw half of the batch
            torch.testing.assert_close(got[rank]["values"][label], value, rtol=1e-12, atol=0, msg=label)
        assert got[rank]["check"] == want["check"] and "(8, 6)" in " ".join(want["check"]), got[rank]["check"]
        assert got[rank]["shapes"] == want["shapes"] == {
            "fc1.weight": (8, 6), "fc1.bias": (8,), "fc2.weight": (8, 8), "fc2.bias": (8,), "out.weight": (4, 8),
            "out.bias": (4,), "head.weight": (1, 4), "head.bias": (1,), "unused.weight": (8, 8),
        }  # fmt: skip


def test_a_partial_placement_is_a_compile_error(ranks: list[list]) -> None:
    for rank in range(2):
        message = ranks[rank][RUNS.index("partial")]
        assert message.startswith("RegCompileError:"), message
        assert "RD104" in message and "Partial" in message and "only Shard and Replicate are supported" in message


def test_compiling_before_fully_shard_is_refused_at_attach(ranks: list[list]) -> None:
    for rank in range(2):
        message = ranks[rank][RUNS.index("stale")]
        assert message.startswith("RegUsageError:") and "compile again after replacing parameters" in message, message


def test_a_reference_sharded_otherwise_than_its_parameter_is_laid_out_as_the_parameter(ranks: list[list]) -> None:
    """``l2 1.0 to ref``: penalty ½‖w − w₀‖², one SGD step w − 0.1·(w − w₀), written here from the
    unsharded layers the worker builds (seeds 0 and 5)."""
    torch.manual_seed(5)
    w_ref = torch.nn.Linear(4, 4, bias=False).double().weight.detach()
    torch.manual_seed(0)
    w = torch.nn.Linear(4, 4, bias=False).double().weight.detach()
    want = 0.5 * (w - w_ref).square().sum()
    for rank in range(2):
        runs = ranks[rank][RUNS.index("refs")]
        assert not isinstance(runs, str), runs
        assert len(runs) == 4  # (HSDP, Shard(1)) x (loss path, fold)
        for k, got in enumerate(runs):
            fold = k % 2 == 1
            torch.testing.assert_close(got["value"], want, rtol=1e-12, atol=0)
            if fold:  # the term is in the step: penalty() holds nothing
                assert float(got["penalty"]) == 0.0
            else:
                torch.testing.assert_close(got["penalty"], want, rtol=1e-12, atol=0)
            torch.testing.assert_close(got["weight"], w - 0.1 * (w - w_ref), rtol=0, atol=1e-12)
