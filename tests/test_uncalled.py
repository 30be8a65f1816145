"""RD205: an activity term on nn.MultiheadAttention's out_proj is a warning, not a silent zero.
MultiheadAttention computes its output from out_proj's weights without calling out_proj, which
the last test shows by running the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regdsl


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x)[0])


def codes(text: str, model: nn.Module) -> list[tuple[str, int, str]]:
    return [(d.code, d.line, d.message) for d in regdsl.check(regdsl.parse(text, "r.reg"), model)]


def test_check_warns_at_the_rule_naming_the_module() -> None:
    found = codes("layer fc decay 0.01\ntype Linear activity l2 0.1\n", Block())
    assert [(c, line) for c, line, _ in found] == [("RD205", 2)]
    assert "'activity l2' on 'attn.out_proj' collects nothing" in found[0][2]


def test_inside_a_torch_transformer_layer_too() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    found = codes("layer self_attn.out_proj activity l1 0.1\n", layer)
    assert [c for c, _, _ in found] == ["RD205"]
    assert "'self_attn.out_proj'" in found[0][2]


@pytest.mark.parametrize(
    "text", ["layer fc activity l2 0.1\n", "type Linear activity l2 0.1\nexclude layer attn.out_proj\n", "layer attn.out_proj decay 0.1\n"]
)
def test_no_warning_where_the_hook_runs_or_no_activity_term(text: str) -> None:
    assert [c for c, _, _ in codes(text, Block()) if c == "RD205"] == []


def test_compile_warns_and_the_term_indeed_collects_nothing() -> None:
    model = Block()
    with pytest.warns(regdsl.RegDslWarning, match="RD205"):
        reg = regdsl.parse("type Linear activity l2 0.1\n", "r.reg").compile(model)
    x = torch.randn(3, 4, 8)
    model(x)
    # activity l2 λ: λ/2·Σ a²/B over each selected module's output; only fc's output is ever seen.
    with torch.no_grad():  # activity hooks collect only while autograd records: not this reference
        want = 0.05 * model.fc(model.attn(x, x, x)[0]).square().sum() / 3
    torch.testing.assert_close(reg.penalty(), want)
