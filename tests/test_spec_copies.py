"""A spec changed in Python with ``model_copy(update=...)`` is validated again, as the text would be.
Pydantic's own copy validates nothing: a negative strength, or a term twice, compiled and trained
(a negative penalty), and ``regdsl.check`` returned no diagnostic."""

from __future__ import annotations

import pydantic
import pytest
from torch import nn

import regdsl


def with_terms(spec: regdsl.Spec, terms: tuple) -> regdsl.Spec:
    rule = spec.statements[0]
    return spec.model_copy(update={"statements": (rule.model_copy(update={"terms": terms}), *spec.statements[1:])})


def test_a_negative_strength_is_refused_as_in_the_text() -> None:
    spec = regdsl.parse("all l2 1e-3")
    term = spec.statements[0].terms[0]
    with pytest.raises(pydantic.ValidationError, match="strength must be >= 0, got -5.0"):
        term.model_copy(update={"strength": -5.0})
    with pytest.raises(regdsl.RegValidationError, match="RD004"):
        regdsl.parse("all l2 -5.0")


def test_a_term_twice_is_refused_as_in_the_text() -> None:
    spec = regdsl.parse("all l2 1e-3 l1 1e-4")
    l2, l1 = spec.statements[0].terms
    with pytest.raises(pydantic.ValidationError, match="'l2' appears twice"):
        with_terms(spec, (l2, l1, l2.model_copy(update={"strength": 1.0})))


def test_lr_decay_without_depth_is_refused_as_in_the_text() -> None:
    with_decay = regdsl.parse("lr_decay 0.5\nall depth 0\nall l2 1e-3")
    plain = regdsl.parse("all l2 1e-3")
    with pytest.raises(pydantic.ValidationError, match="lr_decay"):
        plain.model_copy(update={"lr_decay": with_decay.lr_decay})


def test_a_valid_change_compiles_and_keeps_the_source_for_diagnostics() -> None:
    spec = regdsl.parse("all l2 1e-3\nlayer nothing l1 1e-4\n")
    changed = with_terms(spec, (spec.statements[0].terms[0].model_copy(update={"strength": 0.5}),))
    assert changed.to_source() == "all l2 0.5\nlayer nothing l1 0.0001\n"
    found = regdsl.check(changed, nn.Linear(2, 2))
    assert [d.code for d in found] == ["RD101"]
    assert "layer nothing l1 1e-4" in found[0].render()  # the line as written, with its caret


def _json_with(text: str, change) -> str:
    import json

    data = json.loads(regdsl.parse(text).to_json())
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "change"),
    [
        ("all l2 0.1", lambda d: d["statements"][0]["terms"][0].update(strength=True)),
        ("all l2 0.1", lambda d: d["statements"][0]["terms"][0].update(strength="1e-3")),
        ("all l1 choice(0, 1)", lambda d: d["statements"][0]["terms"][0]["strength"].update(choices=[False, True])),
        ("all l2 uniform(0, 1)", lambda d: d["statements"][0]["terms"][0]["strength"].update(high="1")),
    ],
    ids=["true strength", "string strength", "bool choices", "string bound"],
)
def test_hand_edited_json_takes_numbers_only(text: str, change) -> None:
    # Before, pydantic's lax float read true as 1.0 and "1e-3" as 0.001: a flag became a strength.
    with pytest.raises(regdsl.RegValidationError, match="expected a number, got"):
        regdsl.Spec.from_json(_json_with(text, change))
    assert regdsl.Spec.from_json(_json_with(text, lambda d: None)) == regdsl.parse(text)
