"""The model's table in columns (regdsl.entries): compiling makes no object per tensor, an entry
is made when read and kept, and the columns say what ``named_parameters()`` says.

Objects are counted, not timed: benchmarks/scaling.py times compile."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
from models import MLP, TinyTransformer, gpt2
from test_scaling import Blocks, stack
from torch import nn

import regdsl
from regdsl.select import ParamTable, canonical_name


def test_compile_and_param_groups_make_no_object_per_tensor() -> None:
    """The table keeps columns (regdsl.entries): compiling and building the optimizer's groups leave
    alive the same number of objects the garbage collector tracks for 300 layers as for 600."""
    spec = regdsl.parse("all decay 0.05\nexclude bias\n")

    def tracked(n: int) -> int:
        model = stack(n)
        gc.collect()
        gc.disable()
        try:
            before = len(gc.get_objects())
            reg = regdsl.compile(spec, model)
            groups = reg.param_groups(lr=0.1)
            made = len(gc.get_objects()) - before
        finally:
            gc.enable()
        assert reg.table.entries.made() <= 4
        assert len(groups) == 2 and sum(len(g["params"]) for g in groups) == 2 * n
        return made

    tracked(10)  # what is made once per process
    assert tracked(600) - tracked(300) <= 2


def test_entries_are_made_when_read_and_kept() -> None:
    model = Blocks(3)
    table = ParamTable(model)
    entries = table.entries
    assert entries.made() == 1  # the head's weight is the embedding's: a tied entry is made as the table is read
    named = [(name, param) for name, param in model.named_parameters()]
    assert len(entries) == len(named)
    assert [(e.name, e.param) for e in entries] == named
    assert entries.made() == len(entries)
    assert entries[0] is entries[0] is entries[-len(entries)] and entries[-1].index == len(entries) - 1
    assert entries[1:3] == [entries[1], entries[2]]
    assert entries[0].names == ("embed.weight", "head.weight") and table.tied == [0]
    with pytest.raises(IndexError):
        entries[len(entries)]
    reg = regdsl.parse("all decay 0.05\nexclude bias\n").compile(Blocks(3))
    for _, members in reg.resolution.groups():
        assert members.params == [e.param for e in members] and members.names == tuple(e.name for e in members)
        assert members.numel == sum(e.numel for e in members) and members[0] is next(iter(members))


class Knotted(nn.Module):
    """Everything that makes an entry more than one name: tied weights (one of them under a
    parametrized layer), a shared module, a None bias, parametrized and old-style weight-normed layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.shared = nn.Linear(4, 4, bias=False)
        self.again = nn.Sequential(nn.LayerNorm(4), self.shared)
        with pytest.warns(FutureWarning):
            self.old = nn.utils.weight_norm(nn.Linear(4, 6))
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.fc.bias = self.again[0].bias


@pytest.mark.parametrize("build", [MLP, TinyTransformer, Blocks, gpt2, Knotted])
def test_the_table_columns_are_the_named_parameters(build: Callable[[], nn.Module]) -> None:
    model = build()
    names_of: dict[int, list[str]] = {}  # by tensor, in first-seen order: each name it is registered under
    tensors: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names = names_of.setdefault(id(param), [])
        tensors[id(param)] = param
        if canonical_name(name) not in names:
            names.append(canonical_name(name))
    table = ParamTable(model)
    assert table.params == list(tensors.values())
    assert table.names == [names[0] for names in names_of.values()]
    assert [e.names for e in table.entries] == [tuple(names) for names in names_of.values()]
    assert table.tied == [i for i, names in enumerate(names_of.values()) if len(names) > 1]
    assert table.trainable == [p.requires_grad for p in tensors.values()]
    kinds = sorted(i for members in table.kinds.values() for i in members)
    assert kinds == list(range(len(table)))  # every entry in exactly one kind
    for (types, attributes), members in table.kinds.items():
        assert all(table.entries[i].types == types and table.entries[i].attributes == attributes for i in members)
