"""A file's errors are reported together: a bad number in a rule never hides what is wrong with
the rule as a whole (a repeated term, 'activity' on 'bias', an unused capture, a repeated or
inverted schedule step, depth without lr_decay).

Pydantic skips a model's after-validators when a field fails; before the fix each table row
below showed only its first error, and the second only after the first was fixed.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import regdsl


def _found(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.parse(text, "f.reg")
    return sorted((d.line, d.column, d.code) for d in info.value.diagnostics)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A bad strength, and the same kind written twice.
        ("all l2 -1 l2 2", [(1, 8, "RD004"), (1, 11, "RD006")]),
        # A bad activity strength, and 'activity' on a selector of parameters.
        ("bias activity l1 -1", [(1, 1, "RD008"), (1, 18, "RD004")]),
        # A bad strength, and a capture no depth term uses.
        ("layer blocks.{i} l2 -1", [(1, 7, "RD012"), (1, 21, "RD004")]),
        # warmup 0, and warmup written twice.
        ("all l2 1 warmup 0 warmup 5", [(1, 17, "RD007"), (1, 19, "RD007")]),
        # A bad strength on one line, depth without lr_decay on the next.
        ("all l2 -1\nall depth 0", [(1, 8, "RD004"), (2, 5, "RD013")]),
        # until before from, and warmup 0, in one schedule.
        ("all l2 1 from 5 until 2 warmup 0", [(1, 17, "RD007"), (1, 32, "RD007")]),
        # A repeated warmup and until before from: both, not the first alone.
        ("all l2 1 warmup 1 warmup 2 from 3 until 1", [(1, 19, "RD007"), (1, 35, "RD007")]),
        # lr_decay out of range and with no depth rule to act on.
        ("lr_decay 2\nall l2 1", [(1, 1, "RD013"), (1, 10, "RD013")]),
        # A capture in an exclude and a bad strength in another statement.
        ("exclude layer a.{i}\nall l2 -1", [(1, 15, "RD012"), (2, 8, "RD004")]),
    ],
)
def test_every_error_of_a_rule_is_reported_at_once(text: str, expected: list[tuple[int, int, str]]) -> None:
    assert _found(text) == expected


def test_a_depth_term_that_failed_is_not_also_called_missing() -> None:
    # The capture {i} is used by the depth term; only the offset is wrong. A check that took the failed
    # depth for absent would add "capture '{i}' is used by no depth term".
    text = "lr_decay 0.5\nlayer blocks.{i} depth i + 1.5"
    assert _found(text) == [(2, 28, "RD013")]


def test_a_term_of_unknown_kind_in_json_is_not_a_repeat() -> None:
    data = json.loads(regdsl.parse("all l2 1").to_json())
    data["statements"][0]["terms"] += [{"kind": "l3", "strength": 1}, {"kind": "l3", "strength": 1}]
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.Spec.from_json(json.dumps(data))
    messages = [d.message for d in info.value.diagnostics]
    assert messages and not any("appears twice" in m for m in messages), messages


def test_json_reports_a_bad_value_and_a_repeated_term_at_their_elements() -> None:
    data = json.loads(regdsl.parse("all l2 1").to_json())
    data["statements"][0]["terms"] += [{"kind": "l1", "strength": -2}, {"kind": "l1", "strength": 2}]
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.Spec.from_json(json.dumps(data))
    messages = sorted(d.message for d in info.value.diagnostics)
    assert messages == [
        "statements.0.rule.terms.1.l1.strength: strength must be >= 0, got -2.0",
        "statements.0.rule.terms.2: term 'l1' appears twice in one rule; write it once",
    ]


def test_a_capture_named_like_a_message_field_keeps_its_braces() -> None:
    # The rule's error is raised again, from its rendered message, beside the file's own error
    # (lr_decay with no depth rule): the quoted '{name}' must not be filled in a second time.
    text = "lr_decay 0.5\nlayer blocks.{name} l2 1"
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.parse(text, "f.reg")
    messages = sorted(d.message for d in info.value.diagnostics)
    assert len(messages) == 2, messages
    assert messages[0].startswith("capture '{name}' is used by no depth term of this rule"), messages
    assert messages[1].startswith("lr_decay without a depth rule changes nothing"), messages


# Rules with one fault of the rule as a whole, and a slot for a strength: '{v}' is ' 1' (fine) or '-1' (RD004).
_WHOLE_RULE_FAULTS = [
    "all l2 {v} l2 2",
    "all l2 2 l2 {v}",
    "bias activity l2 {v}",
    "layer a.{{i}} l1 {v}",
    "all l1 {v} warmup 2 warmup 3",
    "all l1 {v} from 4 until 4",
    "type Linear group_lasso {v} dim=1 group_lasso 1",
    "all depth 2 l2 {v}",
]


@settings(max_examples=60, deadline=None)
@given(
    fault=st.sampled_from(_WHOLE_RULE_FAULTS),
    before=st.lists(st.sampled_from(["all l2 1", "bias none", "exclude norm", "# a comment", ""]), max_size=3),
)
def test_a_bad_strength_adds_its_error_and_hides_none(fault: str, before: list[str]) -> None:
    head = "".join(line + "\n" for line in before)
    line = len(before) + 1
    fine, bad = head + fault.format(v=" 1"), head + fault.format(v="-1")
    column = fault.format(v="-1").index("-1") + 1
    assert _found(bad) == sorted({*_found(fine), (line, column, "RD004")})


# ---------------------------------------------------------------- until before the warmup ends


@pytest.mark.parametrize(
    ("text", "column", "ends"),
    [
        ("all l2 1 warmup 10 until 5", 20, 10),
        ("all l2 1 warmup 10 until 10", 20, 10),  # the ramp reaches 1 at step 10, when until has turned it off
        ("all l2 1 from 5 until 10 warmup 100", 17, 105),
        ("all l2 1 from 5 until 6 warmup 1", 17, 6),  # on at step 5 only, where the ramp is 0
    ],
)
def test_until_before_the_warmup_ends_is_rd007_at_the_until(text: str, column: int, ends: int) -> None:
    with pytest.raises(regdsl.RegValidationError) as info:
        regdsl.parse(text, "f.reg")
    (d,) = info.value.diagnostics
    assert (d.line, d.column, d.code) == (1, column, "RD007")
    assert f"must come after the warmup ends (step {ends}): the term would never reach its strength" in d.message


@settings(max_examples=200, deadline=None)
@given(start=st.one_of(st.none(), st.integers(0, 30)), ramp=st.integers(1, 30), until=st.integers(1, 80))
def test_until_is_refused_exactly_when_the_documented_schedule_never_reaches_the_strength(start, ramp, until) -> None:
    s = start or 0
    if until <= s:
        return  # 'until must come after from': its own error
    # docs/language.md: 0 if t < S or t >= E; λ (t − S) / W if S <= t < S + W; λ afterwards.
    strengths = [0.0 if t < s or t >= until else (t - s) / ramp if t < s + ramp else 1.0 for t in range(until + 1)]
    text = f"all l2 1 warmup {ramp} until {until}" + (f" from {start}" if start is not None else "")
    if 1.0 in strengths:
        regdsl.parse(text)
    else:
        with pytest.raises(regdsl.RegValidationError, match="never reach its strength"):
            regdsl.parse(text)
