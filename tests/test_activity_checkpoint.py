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


def test_a_checkpointed_module_keeps_its_forwards_strength_when_a_step_comes_before_backward() -> None:
    # A GAN's order under non-reentrant checkpointing: the forward at strength 0.25, another step (0.5),
    # then the backward. The recomputation in backward ran the hook again at the new strength, which
    # autograd then used: the gradient was twice the value's.
    def gradient(checkpointed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)
        model = Checkpointed().double()
        if not checkpointed:
            model.forward = lambda t: model.fc2(torch.relu(model.fc1(t)))  # type: ignore[method-assign]
        reg = regdsl.parse("layer fc1 activity l2 1 warmup 4\n").compile(model)
        opt = torch.optim.SGD(reg.param_groups(lr=0.0), lr=0.0)
        reg.attach(opt)
        opt.step()  # step 1: strength 0.25
        x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        model(x)
        penalty = reg.penalty()
        opt.step()  # step 2: strength 0.5, before the backward
        model.zero_grad()
        penalty.backward()
        return penalty.detach(), model.fc1.weight.grad.clone()

    # 0.25/2 · Σ fc1(x)² / B, and its gradient, by autograd on the layer itself.
    torch.manual_seed(1)
    layer = Checkpointed().double().fc1
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = layer(x)
    want = 0.25 * 0.5 * h.square().sum() / 4
    want.backward()
    for checkpointed in (False, True):
        value, grad = gradient(checkpointed)
        torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, layer.weight.grad, rtol=1e-12, atol=0)
