"""What a rule file does to every parameter: `resolve(spec, model).rows`, `Regularizer.explain()`
and the renderings of those rows (`format_explain`, `explain_records`, `explain_csv`).

Every expectation is written out by hand from the rule text and the model's
structure (tests/models.py, and GPT-2 / BERT built from small configs): which
tensor gets which term from which line, which exclude removed it, which names
are aliases of one tensor.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import pytest
from models import CNN, MLP, TinyTransformer
from support import aligned_cells
from torch import nn

import regdsl
from regdsl.report import explain_csv, explain_records, format_explain
from regdsl.resolution import ParamRow, resolve

# One row, as the tests write it: (name, aliases, shape, trainable, excluded-by line, {kind: (value, line)}).
Expected = tuple[str, tuple[str, ...], tuple[int, ...], bool, "int | None", dict[str, tuple[float, int]]]


def summary(row: ParamRow) -> Expected:
    excluded = row.excluded_by.pos.line if row.excluded_by else None
    terms = {kind: (s.value, s.pos.line) for kind, s in row.terms.items()}
    return (row.name, row.aliases, row.shape, row.trainable, excluded, terms)


def rows_of(rules: str, model: nn.Module, filename: str = "rules.reg") -> list[ParamRow]:
    """resolve()'s rows; they must be exactly what the compiled Regularizer's explain() returns."""
    spec = regdsl.parse(rules, filename)
    rows = list(resolve(spec, model).rows)
    assert spec.compile(model).explain() == rows
    # Terms are listed in one fixed order (decay, l1, l2), whatever order the file set them in.
    for row in rows:
        assert list(row.terms) == [k for k in ("decay", "l1", "l2") if k in row.terms]
        assert all(s.origin == filename for s in row.terms.values())
        if row.excluded_by:
            assert row.terms == {} and row.excluded_by.origin == filename
    return rows


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check(rows: Sequence[ParamRow], expected: list[Expected]) -> None:
    assert [summary(r) for r in rows] == expected
    assert [r.numel for r in rows] == [numel(e[2]) for e in expected]


# ---------------------------------------------------------------- tests/models.py


MLP_RULES = """\
all decay 0.05 l2 0.001
layer fc2.* l1 0.01
exclude bias
layer head.weight none decay 0.2
layer fc1 l2 0
"""


def test_mlp() -> None:
    rows = rows_of(MLP_RULES, MLP())
    check(rows, [
        # l2 0 on line 5 overrides line 1's l2: a zero is a setting, not an absence.
        ("fc1.weight", (), (16, 6), True, None, {"decay": (0.05, 1), "l2": (0.0, 5)}),
        ("fc1.bias", (), (16,), True, 3, {}),
        ("fc2.weight", (), (16, 16), True, None, {"decay": (0.05, 1), "l1": (0.01, 2), "l2": (0.001, 1)}),
        ("fc2.bias", (), (16,), True, 3, {}),
        # 'none' clears lines 1-2 at its position; the decay after it in the same rule applies.
        ("head.weight", (), (3, 16), True, None, {"decay": (0.2, 4)}),
        ("head.bias", (), (3,), True, 3, {}),
    ])
    head = rows[4].terms["decay"]
    assert head.where == "rules.reg:4"
    assert (head.pos.line, head.pos.column) == (4, 24)  # the 'decay' term, not the rule


CNN_RULES = """\
all l2 0.0005
exclude norm
type Conv2d decay 0.01
layer head.** l1 0.001; layer head.bias none
"""


def test_cnn_with_batchnorm_and_a_frozen_bias() -> None:
    model = CNN()
    model.conv1.bias.requires_grad_(False)
    rows = rows_of(CNN_RULES, model)
    check(rows, [
        ("conv1.weight", (), (4, 3, 3, 3), True, None, {"decay": (0.01, 3), "l2": (0.0005, 1)}),
        ("conv1.bias", (), (4,), False, None, {}),  # frozen: no rule takes part, not even as an exclude
        ("bn1.weight", (), (4,), True, 2, {}),
        ("bn1.bias", (), (4,), True, 2, {}),
        ("conv2.weight", (), (8, 4, 3, 3), True, None, {"decay": (0.01, 3), "l2": (0.0005, 1)}),
        ("bn2.weight", (), (8,), True, 2, {}),
        ("bn2.bias", (), (8,), True, 2, {}),
        ("head.weight", (), (5, 8), True, None, {"l1": (0.001, 4), "l2": (0.0005, 1)}),
        ("head.bias", (), (5,), True, None, {}),  # cleared by the second statement of line 4
    ])
    # BatchNorm's running statistics are buffers, not parameters: no row for them.
    assert not any("running" in r.name or "num_batches" in r.name for r in rows)
    coverage = resolve(regdsl.parse(CNN_RULES), model).coverage()
    counts = lambda c: (c.tensors, c.elements)
    assert counts(coverage.terms["decay"]) == (2, 108 + 288)
    assert counts(coverage.terms["l1"]) == (1, 40)
    assert counts(coverage.terms["l2"]) == (3, 108 + 288 + 40)
    assert counts(coverage.nothing) == (5, 4 + 4 + 8 + 8 + 5)
    assert counts(coverage.excluded) == (4, 4 + 4 + 8 + 8)
    assert counts(coverage.frozen) == (1, 4)


TRANSFORMER_RULES = """\
all decay 0.1
exclude bias
exclude norm
layer lm_head l2 0.001
layer pos_embed decay 0
type Linear l1 1e-5
layer blocks.1.** none
"""


def test_tied_embedding_transformer() -> None:
    model = TinyTransformer()
    model.blocks[0].mlp[2].bias.requires_grad_(False)
    rows = rows_of(TRANSFORMER_RULES, model)
    decay = {"decay": (0.1, 1)}
    expected: list[Expected] = [
        ("pos_embed", (), (8, 16), True, None, {"decay": (0.0, 5)}),
        # The embedding is tied to lm_head: rules that name lm_head (line 4) or match it as a Linear
        # (line 6) reach the one tensor, which is listed once, under its first name.
        ("embed.weight", ("lm_head.weight",), (50, 16), True, None,
         {"decay": (0.1, 1), "l1": (1e-5, 6), "l2": (0.001, 4)}),
    ]
    for i in range(2):
        b = f"blocks.{i}"
        cleared = i == 1  # line 7 clears every term of block 1; excludes still stand
        expected += [
            (f"{b}.ln1.weight", (), (16,), True, 3, {}),
            (f"{b}.ln1.bias", (), (16,), True, 2, {}),  # bias and norm: the first exclude is named
            # MultiheadAttention owns in_proj_weight/in_proj_bias itself; a name ending in '_bias' is a bias.
            (f"{b}.attn.in_proj_weight", (), (48, 16), True, None, {} if cleared else decay),
            (f"{b}.attn.in_proj_bias", (), (48,), True, 2, {}),
            # out_proj is a NonDynamicallyQuantizableLinear: 'type Linear' reaches it through its base class.
            (f"{b}.attn.out_proj.weight", (), (16, 16), True, None, {} if cleared else {**decay, "l1": (1e-5, 6)}),
            (f"{b}.attn.out_proj.bias", (), (16,), True, 2, {}),
            (f"{b}.ln2.weight", (), (16,), True, 3, {}),  # a hand-written RMSNorm
            (f"{b}.mlp.0.weight", (), (64, 16), True, None, {} if cleared else {**decay, "l1": (1e-5, 6)}),
            (f"{b}.mlp.0.bias", (), (64,), True, 2, {}),
            (f"{b}.mlp.2.weight", (), (16, 64), True, None, {} if cleared else {**decay, "l1": (1e-5, 6)}),
            (f"{b}.mlp.2.bias", (), (16,), cleared, 2 if cleared else None, {}),  # frozen in block 0
        ]
    expected += [("ln_f.weight", (), (16,), True, 3, {}), ("ln_f.bias", (), (16,), True, 2, {})]
    check(rows, expected)
    assert sum(r.numel for r in rows) == sum(p.numel() for p in model.parameters())  # the tied tensor once
    # explain says which class line 6 matched where it was a base class; block 1's 'none' hides line 6.
    base = "line 6: 'type Linear' matched NonDynamicallyQuantizableLinear through its base class Linear"
    assert {r.name: r.notes for r in rows if r.notes} == {"blocks.0.attn.out_proj.weight": (base,)}


# ---------------------------------------------------------------- Hugging Face models (no download)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from models import bert, gpt2

    return gpt2, bert


GPT2_RULES = """\
all decay 0.1
exclude bias
exclude norm
exclude embedding
type Conv1D l1 1e-6
"""


def test_gpt2(hf) -> None:
    gpt2, _ = hf
    model = gpt2()  # 2 layers, n_embd 32, vocab 100, 32 positions; lm_head tied to wte
    assert model.lm_head.weight is model.transformer.wte.weight
    rows = rows_of(GPT2_RULES, model, "gpt2.reg")
    conv = {"decay": (0.1, 1), "l1": (1e-6, 5)}
    expected: list[Expected] = [
        ("transformer.wte.weight", ("lm_head.weight",), (100, 32), True, 4, {}),
        ("transformer.wpe.weight", (), (32, 32), True, 4, {}),
    ]
    for i in range(2):
        h = f"transformer.h.{i}"
        expected += [
            (f"{h}.ln_1.weight", (), (32,), True, 3, {}),
            (f"{h}.ln_1.bias", (), (32,), True, 2, {}),
            (f"{h}.attn.c_attn.weight", (), (32, 96), True, None, conv),  # Conv1D weights are (in, out)
            (f"{h}.attn.c_attn.bias", (), (96,), True, 2, {}),
            (f"{h}.attn.c_proj.weight", (), (32, 32), True, None, conv),
            (f"{h}.attn.c_proj.bias", (), (32,), True, 2, {}),
            (f"{h}.ln_2.weight", (), (32,), True, 3, {}),
            (f"{h}.ln_2.bias", (), (32,), True, 2, {}),
            (f"{h}.mlp.c_fc.weight", (), (32, 128), True, None, conv),
            (f"{h}.mlp.c_fc.bias", (), (128,), True, 2, {}),
            (f"{h}.mlp.c_proj.weight", (), (128, 32), True, None, conv),
            (f"{h}.mlp.c_proj.bias", (), (32,), True, 2, {}),
        ]
    expected += [
        ("transformer.ln_f.weight", (), (32,), True, 3, {}),
        ("transformer.ln_f.bias", (), (32,), True, 2, {}),
    ]
    check(rows, expected)
    # lm_head.weight is never a row of its own, only an alias of wte.
    assert "lm_head.weight" not in [r.name for r in rows]
    assert [r.name for r in rows if "lm_head.weight" in r.aliases] == ["transformer.wte.weight"]
    assert rows[0].excluded_by.where == "gpt2.reg:4"

    # Without the exclude, a rule that names the head reaches the embedding row.
    (wte, *_) = rows_of("all decay 0.1\nlayer lm_head l2 0.01\n", model)
    assert summary(wte) == ("transformer.wte.weight", ("lm_head.weight",), (100, 32), True, None,
                            {"decay": (0.1, 1), "l2": (0.01, 2)})


BERT_RULES = """\
all decay 0.01
exclude norm
exclude bias
exclude embedding
"""


def test_bert(hf) -> None:
    _, bert = hf
    model = bert()  # 1 layer, hidden 16, intermediate 32, vocab 50, 16 positions, 2 token types
    rows = rows_of(BERT_RULES, model, "bert.reg")
    decay = {"decay": (0.01, 1)}
    enc = "bert.encoder.layer.0"
    check(rows, [
        ("bert.embeddings.word_embeddings.weight", ("cls.predictions.decoder.weight",), (50, 16), True, 4, {}),
        ("bert.embeddings.position_embeddings.weight", (), (16, 16), True, 4, {}),
        ("bert.embeddings.token_type_embeddings.weight", (), (2, 16), True, 4, {}),
        # Every tensor of a module called LayerNorm (nn.LayerNorm) is excluded by line 2, its bias too:
        # 'exclude norm' comes before 'exclude bias', and the first exclude is the one named.
        ("bert.embeddings.LayerNorm.weight", (), (16,), True, 2, {}),
        ("bert.embeddings.LayerNorm.bias", (), (16,), True, 2, {}),
        (f"{enc}.attention.self.query.weight", (), (16, 16), True, None, decay),
        (f"{enc}.attention.self.query.bias", (), (16,), True, 3, {}),
        (f"{enc}.attention.self.key.weight", (), (16, 16), True, None, decay),
        (f"{enc}.attention.self.key.bias", (), (16,), True, 3, {}),
        (f"{enc}.attention.self.value.weight", (), (16, 16), True, None, decay),
        (f"{enc}.attention.self.value.bias", (), (16,), True, 3, {}),
        (f"{enc}.attention.output.dense.weight", (), (16, 16), True, None, decay),
        (f"{enc}.attention.output.dense.bias", (), (16,), True, 3, {}),
        (f"{enc}.attention.output.LayerNorm.weight", (), (16,), True, 2, {}),
        (f"{enc}.attention.output.LayerNorm.bias", (), (16,), True, 2, {}),
        (f"{enc}.intermediate.dense.weight", (), (32, 16), True, None, decay),
        (f"{enc}.intermediate.dense.bias", (), (32,), True, 3, {}),
        (f"{enc}.output.dense.weight", (), (16, 32), True, None, decay),
        (f"{enc}.output.dense.bias", (), (16,), True, 3, {}),
        (f"{enc}.output.LayerNorm.weight", (), (16,), True, 2, {}),
        (f"{enc}.output.LayerNorm.bias", (), (16,), True, 2, {}),
        # The prediction bias is registered on the head first and tied to decoder.bias.
        ("cls.predictions.bias", ("cls.predictions.decoder.bias",), (50,), True, 3, {}),
        ("cls.predictions.transform.dense.weight", (), (16, 16), True, None, decay),
        ("cls.predictions.transform.dense.bias", (), (16,), True, 3, {}),
        ("cls.predictions.transform.LayerNorm.weight", (), (16,), True, 2, {}),
        ("cls.predictions.transform.LayerNorm.bias", (), (16,), True, 2, {}),
    ])
    in_layer_norm = [r for r in rows if any(".LayerNorm." in n for n in (r.name, *r.aliases))]
    assert len(in_layer_norm) == 8
    assert all(r.excluded_by and r.excluded_by.pos.line == 2 for r in in_layer_norm)


# ---------------------------------------------------------------- renderings of many rows

# Module names of three lengths, the longest far wider than any terminal.
LONG = ["p", "projection_with_a_rather_long_descriptive_name", "x" * 100 + "_projection"]
WIDE_RULES = """\
all decay 0.01
exclude bias
layer layers.1?.** l1 0.001
layer layers.*.x* l2 0.5
"""


class Wide(nn.Module):
    """150 Linear layers (300 tensors) with long names; every 7th frozen; layer 0 also registered as first_again."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(150):
            block = nn.Module()
            block.add_module(f"{LONG[i % 3]}_{i}", nn.Linear(3, 1 + i % 4))
            self.layers.append(block)
            if i % 7 == 0:
                block.requires_grad_(False)
        self.first_again = self.layers[0]  # one module, two names: aliases, not new tensors


def wide_expected() -> list[tuple[str, str, str, str, str, str, str, str]]:
    """The table's cells, row by row, from WIDE_RULES and Wide's structure."""
    rows = []
    for i in range(150):
        module = f"layers.{i}.{LONG[i % 3]}_{i}"
        out = 1 + i % 4
        for kind, shape in (("weight", f"{out}x3"), ("bias", f"{out}")):
            aliases = f"first_again.{LONG[0]}_0.{kind}" if i == 0 else ""
            size = str(out * 3 if kind == "weight" else out)
            if i % 7 == 0:
                rows.append((f"{module}.{kind}", aliases, shape, size, "-", "-", "-", "frozen"))
            elif kind == "bias":
                rows.append((f"{module}.{kind}", aliases, shape, size, "-", "-", "-", "excluded:2"))
            else:
                l1 = 10 <= i <= 19  # layers.1? : two-digit indices starting with 1
                l2 = i % 3 == 2  # the module whose name starts with x
                set_by = "decay:1" + (" l1:3" if l1 else "") + (" l2:4" if l2 else "")
                rows.append((f"{module}.{kind}", aliases, shape, size, "0.01",
                             "0.001" if l1 else "-", "0.5" if l2 else "-", set_by))
    return rows


@pytest.fixture(scope="module")
def wide_rows() -> list[ParamRow]:
    return rows_of(WIDE_RULES, Wide(), "wide.reg")


def test_format_explain_of_300_tensors_is_aligned_and_never_cuts_a_name(wide_rows: list[ParamRow]) -> None:
    assert len(wide_rows) == 300
    lines = format_explain(wide_rows).split("\n")
    assert len(lines) == 2 + 300  # one line per tensor, nothing wrapped
    cells = aligned_cells(lines, right={3})
    assert cells[0] == ["parameter", "aliases", "shape", "numel", "decay", "l1", "l2", "set by (line)"]
    assert [tuple(c) for c in cells[1:]] == wide_expected()
    longest = max(len(f"layers.{i}.{LONG[i % 3]}_{i}.weight") for i in range(150))
    assert longest > 110
    assert lines[1].startswith("-" * longest + "  ")  # the name column is as wide as the longest name
    for line, row in zip(lines[2:], wide_rows):
        assert line.startswith(row.name + " ")


def test_explain_records_agree_with_the_rows(wide_rows: list[ParamRow]) -> None:
    document = explain_records(wide_rows)
    assert json.loads(json.dumps(document)) == document  # plain JSON types only
    assert document["modules"] == []  # no activity term, no module rows
    records = document["parameters"]
    assert len(records) == len(wide_rows)
    for record, row in zip(records, wide_rows):
        assert record["name"] == row.name
        assert record["aliases"] == list(row.aliases)
        assert record["shape"] == list(row.shape)
        assert record["numel"] == row.numel
        assert record["trainable"] is row.trainable
        if row.excluded_by is None:
            assert record["excluded_by"] is None
        else:
            pos = row.excluded_by.pos
            assert record["excluded_by"] == {"file": "wide.reg", "line": pos.line, "column": pos.column}
        assert record["terms"] == {
            # A plain term's text is its number as the canonical form prints it.
            kind: {"value": s.value, "text": repr(s.value), "file": "wide.reg", "line": s.pos.line, "column": s.pos.column}
            for kind, s in row.terms.items()
        }
    # Spot checks written by hand: layer 0 is frozen and shared, layer 10's weight gets l1 from line 3.
    assert records[0]["aliases"] == [f"first_again.{LONG[0]}_0.weight"] and records[0]["trainable"] is False
    ten = records[20]
    assert ten["name"] == f"layers.10.{LONG[1]}_10.weight" and ten["shape"] == [3, 3]
    assert ten["terms"]["l1"] == {"value": 0.001, "text": "0.001", "file": "wide.reg", "line": 3, "column": 20}
    assert records[3]["excluded_by"] == {"file": "wide.reg", "line": 2, "column": 1}


def test_explain_csv_agrees_with_the_rows(wide_rows: list[ParamRow]) -> None:
    table = list(csv.reader(io.StringIO(explain_csv(wide_rows))))
    assert table[0] == [
        "name", "aliases", "shape", "numel", "trainable", "excluded_by_line",
        "decay", "decay_line", "l1", "l1_line", "l2", "l2_line",
    ]
    assert len(table) == 1 + len(wide_rows)
    for cells, row in zip(table[1:], wide_rows):
        assert cells[0] == row.name
        assert cells[1] == ";".join(row.aliases)
        assert cells[2] == "x".join(map(str, row.shape))
        assert int(cells[3]) == row.numel
        assert cells[4] == str(row.trainable)
        assert cells[5] == (str(row.excluded_by.pos.line) if row.excluded_by else "")
        for k, kind in enumerate(("decay", "l1", "l2")):
            value, line = cells[6 + 2 * k], cells[7 + 2 * k]
            setting = row.terms.get(kind)
            if setting:
                assert (float(value), int(line)) == (setting.value, setting.pos.line)
            else:
                assert (value, line) == ("", "")
    # Hand-written: layer 17 (trainable, 17 % 7 = 3; out = 1 + 17 % 4 = 2) gets decay, l1 (layers 10-19)
    # and l2 (17 % 3 == 2: its module's name starts with x).
    row17 = next(c for c in table[1:] if c[0] == f"layers.17.{LONG[2]}_17.weight")
    assert row17 == [
        f"layers.17.{LONG[2]}_17.weight", "", "2x3", "6", "True", "", "0.01", "1", "0.001", "3", "0.5", "4",
    ]


def test_renderings_of_a_tied_model_agree(hf) -> None:
    gpt2, _ = hf
    rows = rows_of(GPT2_RULES, gpt2(), "gpt2.reg")
    lines = format_explain(rows).split("\n")
    cells = aligned_cells(lines, right={3})
    assert cells[1][:2] == ["transformer.wte.weight", "lm_head.weight"]
    assert cells[1][-1] == "excluded:4"
    assert cells[5] == ["transformer.h.0.attn.c_attn.weight", "", "32x96", "3,072", "0.1", "1e-06", "-", "decay:1 l1:5"]
    assert all(c[1] == "" for c in cells[2:])  # no other tensor has an alias
    record = explain_records(rows)["parameters"][0]
    assert record["aliases"] == ["lm_head.weight"]
    assert record["excluded_by"] == {"file": "gpt2.reg", "line": 4, "column": 1}
    first = next(csv.reader(io.StringIO(explain_csv(rows).split("\n", 1)[1])))
    assert first[:6] == ["transformer.wte.weight", "lm_head.weight", "100x32", "3200", "True", "4"]
