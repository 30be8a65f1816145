"""Activity terms under non-reentrant activation checkpointing and gradient accumulation.

Checkpointing reruns a block's forward during backward; the activity hooks must not
count that rerun, or the next micro-step's penalty() would take it as well.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import regdsl


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: torch.relu(self.fc1(t)), x, use_reentrant=False)
        return self.fc2(h)


def test_recomputation_in_backward_is_not_counted_under_gradient_accumulation() -> None:
    torch.manual_seed(0)
    model = Checkpointed()
    reg = regdsl.parse("layer fc1 activity l1 0.5\n").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=0.0), lr=0.0)
    reg.attach(opt)
    batches = [torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)]
    for x in batches:  # three micro-steps, one optimizer step
        out = model(x)
        penalty = reg.penalty()
        # λ · Σ|fc1(x)| / batch, written out from the layer itself.
        with torch.no_grad():  # hooks collect nothing here
            expected = 0.5 * model.fc1(x).abs().sum() / x.shape[0]
        torch.testing.assert_close(penalty.detach(), expected)
        (out.sum() + penalty).backward()  # recomputes fc1 inside backward
    opt.step()
