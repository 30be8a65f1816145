"""The spec's schedule nodes (``warmup``, ``from``, ``until``, ``cosine ... to ... over``) and the
number checks that terms share with them. What a schedule does to a strength is
:mod:`regdsl.schedule`'s."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .nodes import Node, raw_items, readable, validated_and_checked
from .space_nodes import Number

# Step counts and dims are int64 everywhere they go (torch, the schedule's float arithmetic),
# and a bound keeps every accepted number printable: str() refuses ints of 4,300+ digits.
MAX_WHOLE = 2**63 - 1


def _whole_number(value: Any, code: str, message: str, what: str, out_of_range: str) -> int:
    """An int from an int or an integral float; JSON may send anything, so anything else is an error."""
    if isinstance(value, int) and not isinstance(value, bool):
        whole = value
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        whole = int(value)
    else:
        raise PydanticCustomError(code, message, {"what": what, "value": value})
    if abs(whole) > MAX_WHOLE:
        # The value stays out of the message: it may be a stand-in for a literal too long to read.
        raise PydanticCustomError(code, out_of_range, {"what": what})
    return whole


def _whole_steps(value: Any, what: str, minimum: int) -> int:
    value = _whole_number(
        value,
        "schedule",
        "{what} takes a whole number of steps, got {value}",
        what,
        "{what} is out of range: a step count is at most 2**63 - 1",
    )
    if value < minimum:
        raise PydanticCustomError("schedule", "{what} must be >= {minimum}, got {value}", {"what": what, "minimum": minimum, "value": int(value)})
    return int(value)


class WarmupStep(Node):
    """Linear ramp from 0 to the strength over ``steps`` optimizer steps."""

    kind: Literal["warmup"] = "warmup"
    steps: int

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: float) -> int:
        return _whole_steps(value, "warmup", 1)


class FromStep(Node):
    """The term is 0 before optimizer step ``step``."""

    kind: Literal["from"] = "from"
    step: int

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, value: float) -> int:
        return _whole_steps(value, "from", 0)


class UntilStep(Node):
    """The term is 0 from optimizer step ``step`` on."""

    kind: Literal["until"] = "until"
    step: int

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, value: float) -> int:
        return _whole_steps(value, "until", 1)


class CosineStep(Node):
    """Half-cosine anneal from the strength to ``end`` over ``steps`` optimizer steps."""

    kind: Literal["cosine"] = "cosine"
    end: Number
    steps: int

    @field_validator("end")
    @classmethod
    def _end(cls, value: float) -> float:
        return _check_strength(value)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: float) -> int:
        return _whole_steps(value, "over", 1)


ScheduleStep = Annotated[WarmupStep | FromStep | UntilStep | CosineStep, Field(discriminator="kind")]


class Schedule(Node):
    """How a strength changes with the optimizer step; see :func:`regdsl.schedule.factor`."""

    steps: tuple[ScheduleStep, ...] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _checked(cls, data: Any, handler: Any) -> Any:
        return validated_and_checked(cls.__name__, data, handler, (_once_each, _from_before_until), _lenient_schedule)

    def get(self, kind: str) -> Any:
        return next((s for s in self.steps if s.kind == kind), None)

    def _meaning(self) -> tuple[Any, ...]:
        # Written order carries no meaning: 'warmup 3 from 2' is 'from 2 warmup 3' (one group, not two).
        return (tuple(sorted(self.steps, key=lambda s: s.kind)),)


_STEP: TypeAdapter[Any] = TypeAdapter(ScheduleStep)
_STEP_KINDS = ("warmup", "from", "until", "cosine")


def _lenient_schedule(data: Any) -> Any:
    return SimpleNamespace(steps=[readable(_STEP, step, _STEP_KINDS) for step in raw_items(data, "steps")])


def _once_each(schedule: Any) -> None:
    seen: set[str] = set()
    for index, step in enumerate(schedule.steps):
        if step.kind in seen:
            raise PydanticCustomError(
                "schedule", "'{kind}' appears twice in one schedule; write it once", {"kind": step.kind, "at": f"steps.{index}"}
            )
        if step.kind is not None:
            seen.add(step.kind)


def _from_before_until(schedule: Any) -> None:
    start, until, warmup = (next((s for s in schedule.steps if s.kind == k), None) for k in ("from", "until", "warmup"))
    if until is None or hasattr(until, "failed") or hasattr(start, "failed"):
        return
    at = f"steps.{schedule.steps.index(until)}"
    if start is not None and until.step <= start.step:
        raise PydanticCustomError(
            "schedule",
            "until {until} must come after from {start}: the term would never be on",
            {"until": until.step, "start": start.step, "at": at},
        )
    if warmup is None or hasattr(warmup, "failed"):
        return
    ramped = (start.step if start is not None else 0) + warmup.steps
    if until.step <= ramped:
        # The ramp reaches the strength at step from + warmup; 'until' switches the term off before that.
        raise PydanticCustomError(
            "schedule",
            "until {until} must come after the warmup ends (step {ramped}): the term would never reach its strength",
            {"until": until.step, "ramped": ramped, "at": at},
        )


def _check_strength(value: float, what: str = "strength") -> float:
    if not math.isfinite(value):
        raise PydanticCustomError("strength", "{what} must be a finite number, got {value}", {"what": what, "value": value})
    if value < 0:
        raise PydanticCustomError("strength", "{what} must be >= 0, got {value}", {"what": what, "value": value})
    return value + 0.0  # -0.0 becomes 0.0, so it prints as 0.0
