"""The spec's search-space nodes: a strength written as ``loguniform(a, b)``, ``uniform(a, b)`` or
``choice(v1, v2, ...)``, optionally named (``as head_l2``) so that other terms can write the bare
name and share its value. What is done with them (values, Optuna, grids) is :mod:`regdsl.spaces`'s.

A name a term writes is bound to its space when the :class:`~regdsl.spec.Spec` is validated
(:func:`bind_names`): every use then holds a copy of the space, marked ``ref``, so each term can
check the space against its own rule (``max_norm`` needs values > 0) and the printer writes the
bare name back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from .nodes import Node


def _plain_number(value: Any) -> Any:
    """JSON's ``true`` and ``"1e-3"``: pydantic's lax float reads them as 1.0 and 0.001, so a
    hand-edited flag would become a strength of 1. Only numbers are numbers."""
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("number", "expected a number, got {value}", {"value": repr(value)})
    return value


Number = Annotated[float, BeforeValidator(_plain_number)]

# The fields of a term that a number, or a space, fills (the rest of a term's numbers are not tunable).
VALUE_FIELDS = ("strength", "norm", "factor")


def _finite(value: float, kind: str, at: str) -> None:
    if not math.isfinite(value):
        raise PydanticCustomError("space", "the values of {kind}(...) must be finite numbers, got {value}", {"kind": kind, "value": value, "at": at})


def _check_name(name: str | None) -> None:
    """A space's name must read back as that name: a word, no keyword, no number word."""
    from .parser import KEYWORDS

    if name is None:
        return
    if name in KEYWORDS:
        raise PydanticCustomError(
            "space",
            "'{name}' is a keyword of the language: a value here is a number, a search space "
            "(loguniform(a, b), uniform(a, b), choice(...)) or the name of one",
            {"name": name, "at": "name"},
        )
    if not _WORD.fullmatch(name):
        # Only from JSON (the grammar reads no other name): to_source() could not write it back.
        raise PydanticCustomError(
            "space",
            "a search space's name is a word of letters, digits and '_' that does not start with a digit, not '{name}'",
            {"name": name, "at": "name"},
        )
    if name.lower() in _NUMBER_WORDS:
        # Where a strength stands the lexer reads these as numbers: the space could never be referenced.
        raise PydanticCustomError(
            "space",
            "a search space cannot be named '{name}': where a strength stands, '{name}' reads as a number",
            {"name": name, "at": "name"},
        )


_NUMBER_WORDS = frozenset({"inf", "infinity", "nan"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Space(Node):
    """``name``: given with ``as NAME``, or the bare name a term wrote (``ref``)."""

    name: str | None = None
    ref: bool = False

    @model_validator(mode="after")
    def _name(self) -> _Space:
        if self.ref:
            return self
        _check_name(self.name)
        return self

    def __str__(self) -> str:
        """The space as the language writes it, without its name: ``loguniform(1e-05, 0.01)``."""
        from .printer import format_space

        return format_space(self, definition=True)

    def values_to_check(self) -> list[tuple[str | int, float]]:
        raise NotImplementedError

    def contains(self, value: float) -> bool:
        raise NotImplementedError

    @property
    def stand_in(self) -> float:
        """A value inside the space, > 0 where the space allows it: what ``check`` and ``explain``
        resolve the rules with, so that a term that may be on is never taken as always off."""
        raise NotImplementedError


class _Interval(_Space):
    low: Number
    high: Number

    @model_validator(mode="after")
    def _ordered(self) -> _Interval:
        if self.ref:  # a use repeats its definition, which reports what is wrong with it
            return self
        _finite(self.low, self.kind, "low")  # type: ignore[attr-defined]
        _finite(self.high, self.kind, "high")  # type: ignore[attr-defined]
        if self.low >= self.high:
            raise PydanticCustomError(
                "space",
                "{kind}(a, b) needs a < b, got a = {low}, b = {high}",
                {"kind": self.kind, "low": self.low, "high": self.high, "at": "high"},  # type: ignore[attr-defined]
            )
        return self

    def values_to_check(self) -> list[tuple[str | int, float]]:
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


class LogUniformSpace(_Interval):
    """Values between ``low`` and ``high``, uniform in log space (Optuna's ``log=True``)."""

    kind: Literal["loguniform"] = "loguniform"

    @model_validator(mode="after")
    def _positive(self) -> LogUniformSpace:
        if self.low <= 0 and not self.ref:
            raise PydanticCustomError(
                "space",
                "loguniform(a, b) needs a > 0, got a = {low}: its bounds are values, not exponents (1e-5, not -5)",
                {"low": self.low, "at": "low"},
            )
        return self

    @property
    def stand_in(self) -> float:
        # The geometric mean, as a product of roots: low * high over- or underflows at the extremes.
        return min(max(math.sqrt(self.low) * math.sqrt(self.high), self.low), self.high)


class UniformSpace(_Interval):
    """Values between ``low`` and ``high``, uniformly."""

    kind: Literal["uniform"] = "uniform"

    @property
    def stand_in(self) -> float:
        return self.low / 2 + self.high / 2  # (low + high) / 2 overflows near the largest float


class ChoiceSpace(_Space):
    """One of the listed values."""

    kind: Literal["choice"] = "choice"
    choices: tuple[Number, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> ChoiceSpace:
        if self.ref:
            return self
        seen: set[float] = set()
        for index, value in enumerate(self.choices):
            _finite(value, "choice", f"choices.{index}")
            if value in seen:
                raise PydanticCustomError(
                    "space_duplicate", "choice(...) lists {value} twice; list each value once", {"value": value, "at": f"choices.{index}"}
                )
            seen.add(value)
        return self

    def values_to_check(self) -> list[tuple[str | int, float]]:
        return [(f"choices.{i}", v) for i, v in enumerate(self.choices)]

    def contains(self, value: float) -> bool:
        return value in self.choices

    @property
    def stand_in(self) -> float:
        return next((v for v in self.choices if v), self.choices[0])


class SpaceName(Node):
    """A bare name, as a term wrote it, that :func:`bind_names` could not bind: never valid."""

    kind: Literal["name"] = "name"
    name: str
    defined_at: int | None = None  # the line of the first definition, when this one defines the name again

    @model_validator(mode="after")
    def _unbound(self) -> SpaceName:
        _check_name(self.name)
        if self.defined_at is not None:
            raise PydanticCustomError(
                "space",
                "search space '{name}' is already defined on line {line}; write the bare name to reuse it",
                {"name": self.name, "line": self.defined_at},
            )
        raise PydanticCustomError(
            "space_unbound",
            "no search space is named '{name}': name one with 'as {name}' after loguniform(...), uniform(...) or choice(...)",
            {"name": self.name},
        )


Space = Annotated[LogUniformSpace | UniformSpace | ChoiceSpace, Field(discriminator="kind")]
SPACE_TYPES = (LogUniformSpace, UniformSpace, ChoiceSpace)
_SPACE_KINDS = ("loguniform", "uniform", "choice")


def _number_or_space(value: Any) -> str:
    if isinstance(value, dict):
        return "name" if value.get("kind") == "name" else "space"
    if isinstance(value, SpaceName):
        return "name"
    return "space" if isinstance(value, _Space) else "number"


# A term's value: a number or a space. The callable discriminator sends each input down one branch,
# so a bad space reports its own problem, not also that it is not a number.
Value = Annotated[
    Annotated[Number, Tag("number")] | Annotated[Space, Tag("space")] | Annotated[SpaceName, Tag("name")],
    Discriminator(_number_or_space),
]


def check_value(value: Any, check: Callable[[float], float]) -> Any:
    """``check`` (a term's rule for its number) applied to a number, or to every value a space holds."""
    if not isinstance(value, _Space):
        return check(value)
    for at, number in value.values_to_check():
        try:
            check(number)
        except PydanticCustomError as exc:
            # The term's own message, then which value of the space broke it.
            template = exc.message_template + " (a value of {space})"
            shown = f"{value.kind}({', '.join(repr(v) for _, v in value.values_to_check())})"
            raise PydanticCustomError(exc.type, template, {**(exc.context or {}), "space": shown, "at": at}) from None
    return value


def bind_names(data: Any) -> Any:
    """Spec input with every bare name replaced by a copy of the space it names (marked ``ref``),
    and every name that names nothing, or is defined twice, left as a :class:`SpaceName` that
    fails validation where it stands. Dicts (parsed text, JSON) and model instances both come here."""
    if not isinstance(data, dict) or not isinstance(data.get("statements"), (list, tuple)):
        return data
    statements = [s.model_dump() if isinstance(s, BaseModel) else s for s in data["statements"]]
    slots = [
        (term, field)
        for s in statements
        if isinstance(s, dict) and isinstance(s.get("terms"), (list, tuple))
        for term in s["terms"]
        if isinstance(term, dict)
        for field in VALUE_FIELDS
        if isinstance(term.get(field), dict)
    ]
    lr_decay = data.get("lr_decay")
    if isinstance(lr_decay, BaseModel):
        lr_decay = lr_decay.model_dump()
    if isinstance(lr_decay, dict) and isinstance(lr_decay.get("factor"), dict):
        slots.append((lr_decay, "factor"))
    if not slots:
        return data if statements == list(data["statements"]) else {**data, "statements": statements}
    if lr_decay is not None:
        data = {**data, "lr_decay": lr_decay}
    # In file order, lr_decay's line among the others: the first definition is the one on the earliest line.
    places = [_place(term[field].get("pos")) for term, field in slots]
    if all(place is not None for place in places):
        slots = [slot for _, slot in sorted(zip(places, slots), key=lambda pair: pair[0])]
    defined: dict[str, dict[str, Any]] = {}
    for term, field in slots:
        value = term[field]
        name = value.get("name")
        if value.get("kind") not in _SPACE_KINDS or not isinstance(name, str) or value.get("ref"):
            continue
        if name in defined:
            first = defined[name].get("pos")
            line = first.get("line", 0) if isinstance(first, dict) else getattr(first, "line", 0)  # JSON may send anything
            term[field] = {"kind": "name", "name": name, "defined_at": line, "pos": value.get("pos")}
        else:
            defined[name] = value
    for term, field in slots:
        value = term[field]
        name = value.get("name")
        if value.get("kind") == "name" and value.get("defined_at") is None and isinstance(name, str) and name in defined:
            # A copy of the choices too: the list's identity is how build.py finds a value's position,
            # and a value this use refuses is this use's error, not the definition's.
            space = {k: list(v) if isinstance(v, list) else v for k, v in defined[name].items()}
            term[field] = {**space, "ref": True, "pos": value.get("pos")}
    return {**data, "statements": statements}


def _place(pos: Any) -> tuple[int, int] | None:
    """A position's (line, column), from parsed text (a dict) or a Span; None where there is none."""
    if isinstance(pos, dict):
        line, column = pos.get("line"), pos.get("column")
    else:
        line, column = getattr(pos, "line", None), getattr(pos, "column", None)
    return (line, column) if isinstance(line, int) and isinstance(column, int) else None
