"""Details of the explain table that a reader relies on."""

from __future__ import annotations

from torch import nn

import regdsl
from regdsl.report import explain_records, format_explain


def _rows(text: str, model: nn.Module) -> dict[str, list[str]]:
    table = format_explain(regdsl.resolve(regdsl.parse(text, "r.reg"), model).rows)
    return {line.split()[0]: line.split() for line in table.splitlines()[2:]}


def test_set_by_tells_a_none_from_no_rule_at_all() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    rows = _rows("layer 0 l2 1\nlayer 0.bias none\n", model)
    assert rows["0.weight"][-1] == "l2:1"
    assert rows["0.bias"][-1] == "none:2"  # cleared on line 2
    assert rows["1.weight"][-1] == "-"  # no rule reached it


def test_values_are_printed_exactly() -> None:
    rows = _rows("all l1 0.000012345678\n", nn.Linear(2, 2))
    # Columns: parameter, shape, numel, decay, l1, l2, set by
    assert rows["weight"][4] == "1.2345678e-05"
    assert float(rows["weight"][4]) == 0.000012345678


def test_a_lazy_parameter_has_no_shape_yet() -> None:
    model = nn.Sequential(nn.LazyLinear(3))
    resolution = regdsl.resolve(regdsl.parse("all decay 0.1"), model)
    rows = _rows("all decay 0.1", model)
    assert rows["0.weight"][1] == "lazy"
    assert explain_records(resolution.rows)["parameters"][0]["shape"] is None
