"""RD103 on depth rules: a depth on a frozen parameter is an effect, since the deepest depth is taken
over every parameter, frozen ones included (docs/language.md, "Depth and lr_decay"). RD103 judged
depth on trainable parameters only, and called dead a rule whose deletion changed every lr factor."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import regdsl
from regdsl.resolution import resolve


class Adapted(nn.Module):
    """A frozen embedding, blocks and head, with a trainable adapter in each block (LoRA-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"base": nn.Linear(4, 4), "adapter": nn.Linear(4, 4)}) for _ in range(3))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)
        for module in (self.embed, self.norm, self.head, *(b["base"] for b in self.blocks)):
            module.requires_grad_(False)


def dead(text: str) -> set[int]:
    return {d.line for d in regdsl.check(regdsl.parse(text), Adapted()) if d.code == "RD103"}


def effect(text: str) -> list[tuple]:
    rows = resolve(regdsl.parse(text), Adapted()).rows
    return [(r.name, r.depth, r.lr_factor, {k: s.value for k, s in r.terms.items() if k != "depth"}) for r in rows]


def test_a_depth_default_that_only_frozen_parameters_keep_is_not_dead() -> None:
    text = "all depth last\nlayer embed depth 0\nlayer blocks.{i} depth i + 1\nlr_decay 0.5\n"
    assert dead(text) == set()
    # Deleting line 1, as RD103 advised, moved the deepest depth from 4 to 3: every lr factor doubled.
    without = "\n".join(text.splitlines()[1:]) + "\n"
    assert [f for *_, f, _ in effect(text) if f is not None] != [f for *_, f, _ in effect(without) if f is not None]


def test_a_depth_every_parameter_gets_again_later_is_still_dead() -> None:
    assert dead("all depth 1\nall depth 2\nlr_decay 0.5\n") == {1}


_SELECTORS = ["all", "layer embed", "layer blocks.*.adapter", "layer blocks.*.base", "layer head", "bias", "layer norm"]


@st.composite
def statement(draw: st.DrawFn) -> str:
    selector = draw(st.sampled_from(_SELECTORS))
    term = draw(st.sampled_from(["depth 0", "depth 1", "depth 2", "depth last", "l2 0.1", "decay 0.1"]))
    return f"{selector} {term}"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statement(), min_size=1, max_size=6))
def test_deleting_a_dead_depth_rule_changes_no_depth_and_no_lr_factor(lines: list[str]) -> None:
    lines = ["all depth 0", *lines, "lr_decay 0.5"]  # every parameter has a depth: no RD206
    text = "\n".join(lines) + "\n"
    before = effect(text)
    for line in dead(text):
        rest = "\n".join(s for i, s in enumerate(lines, start=1) if i != line) + "\n"
        assert effect(rest) == before, f"line {line} was called dead, but deleting it changes the result"
