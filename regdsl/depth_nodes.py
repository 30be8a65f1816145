"""The spec's nodes for layer-wise learning-rate decay: the ``depth`` term, its expression, the
``lr_decay`` statement, and the checks that tie captures (``layer blocks.{i}``) to depths.

What a depth does to a learning rate is :mod:`regdsl.depth`'s; the formula is in
docs/language.md, "Depth and lr_decay".
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .glob import glob_captures
from .nodes import LayerAtom, Node, Selector, TypeAtom
from .schedule_nodes import _whole_number
from .space_nodes import SPACE_TYPES, Value, check_value


def _whole_at_least_0(value: Any, what: str) -> int:
    whole = _whole_number(
        value, "depth", "{what} must be a whole number >= 0, got {value}", what, "{what} is out of range: at most 2**63 - 1"
    )
    if whole < 0:
        raise PydanticCustomError("depth", "{what} must be a whole number >= 0, got {value}", {"what": what, "value": whole})
    return whole


class _Offset(Node):
    # `+ N` or `- N` after a capture or `last`; `+ 0` and `- 0` mean no offset.
    op: Literal["+", "-"] | None = None
    amount: int = 0

    @field_validator("amount", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int:
        return _whole_at_least_0(value, "the number after '+' or '-'")

    @model_validator(mode="after")
    def _canonical(self) -> Any:
        if self.op is not None and self.amount == 0:
            object.__setattr__(self, "op", None)
        elif self.op is None and self.amount:
            raise PydanticCustomError("depth", "an offset needs '+' or '-'", {})
        return self

    @property
    def offset(self) -> int:
        return -self.amount if self.op == "-" else self.amount


class DepthNumber(Node):
    """A depth written as a whole number."""

    kind: Literal["number"] = "number"
    value: int

    @field_validator("value", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int:
        return _whole_at_least_0(value, "depth")


class DepthCapture(_Offset):
    """The whole number a capture of the rule's layer glob matched, plus or minus an offset."""

    kind: Literal["capture"] = "capture"
    name: str


class DepthLast(_Offset):
    """``last``: the largest depth a number or capture gives any parameter of the model, plus 1."""

    kind: Literal["last"] = "last"


DepthExpr = Annotated[DepthNumber | DepthCapture | DepthLast, Field(discriminator="kind")]


class DepthTerm(Node):
    """The parameter's depth: its lr is scaled by ``lr_decay ** (deepest - depth)``."""

    kind: Literal["depth"] = "depth"
    expr: DepthExpr

    @property
    def value(self) -> float | None:
        """The depth when it is the same for every parameter (a number), else None."""
        return float(self.expr.value) if isinstance(self.expr, DepthNumber) else None


class LrDecay(Node):
    """``lr_decay D``: every parameter's lr multiplier is scaled by ``D ** (deepest - depth)``."""

    kind: Literal["lr_decay"] = "lr_decay"
    factor: Value  # a number, or a search space whose every value is in (0, 1]
    # Set on the copies regdsl.spaces.stand_in makes: the space a stand-in value replaced.
    _space: Any = PrivateAttr(default=None)
    _space_name: str | None = PrivateAttr(default=None)  # its name in spec.spaces(): which space, of equal ones

    @field_validator("factor")
    @classmethod
    def _in_range(cls, value: Any) -> Any:
        return check_value(value, _check_decay)

    @property
    def value(self) -> Any:
        return self.factor

    @property
    def space(self) -> Any:
        """The search space the factor is drawn from, or None for a plain number."""
        return self.factor if isinstance(self.factor, SPACE_TYPES) else self._space


def _check_decay(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 1:
        raise PydanticCustomError("lr_decay", "lr_decay must be a number in (0, 1], got {value}", {"value": value})
    return value


# ---------------------------------------------------------------- captures against terms


def _capture_error(message: str, at: str, name: str) -> PydanticCustomError:
    # Pydantic's templates have no escape for a brace: the braced capture comes in as a value.
    return PydanticCustomError("capture", message, {"name": name, "capture": f"{{{name}}}", "at": at})


def check_captures(selector: Selector, terms: Sequence[Any] | None) -> None:
    """A capture binds a depth and nothing else: only a ``layer`` pattern of a rule whose
    ``depth`` names it may hold one, and a ``depth`` names only a capture every pattern of one
    ``layer`` atom binds. ``terms`` is None for an exclude. Raises the first problem, positioned."""
    depth = next((t for t in terms or () if t.kind == "depth"), None)
    used = depth.expr.name if depth is not None and isinstance(depth.expr, DepthCapture) else None
    binders = []  # indices of the layer atoms whose every pattern binds `used`
    for a, atom in enumerate(selector.atoms):
        if not isinstance(atom, (LayerAtom, TypeAtom)):
            continue
        for p, pattern in enumerate(atom.patterns):
            captures = glob_captures(pattern.text)
            at = f"selector.atoms.{a}.patterns.{p}"
            for name in captures:
                if isinstance(atom, TypeAtom):
                    raise _capture_error("a capture ('{capture}') stands only in a layer pattern, never in a type", at, name=name)
                if terms is None:
                    raise _capture_error(
                        "capture '{capture}' in an exclude: a capture binds a depth, as in 'layer blocks.{capture} "
                        "depth {name}'; write '*' to match any component", at, name=name,
                    )
                if name != used:
                    raise _capture_error(
                        "capture '{capture}' is used by no depth term of this rule; write '*' to match any "
                        "component, or use it: 'depth {name} + 1'", at, name=name,
                    )
        if isinstance(atom, LayerAtom) and used is not None:
            bound = [used in glob_captures(pattern.text) for pattern in atom.patterns]
            if any(bound):
                missing = bound.index(False) if not all(bound) else None
                if missing is not None:
                    raise _capture_error(
                        "depth names capture '{name}', but this pattern binds no '{capture}': every pattern "
                        "of the layer atom must bind it", f"selector.atoms.{a}.patterns.{missing}", name=used,
                    )
                binders.append(a)
    if used is not None and not binders:
        index = list(terms or ()).index(depth)
        hint = "; did you mean 'last'?" if difflib.get_close_matches(used.lower(), ["last"], cutoff=0.5) else ""
        raise _capture_error(
            "depth names '{name}', but no layer pattern of this rule binds a capture '{capture}' "
            "(as in 'layer blocks.{capture}.**')" + hint, f"terms.{index}.expr", name=used,
        )
    if len(binders) > 1:
        raise _capture_error(
            "capture '{capture}' is bound by two layer atoms of one selector; bind it in one",
            f"selector.atoms.{binders[1]}", name=used,
        )


def check_lr_decay(statements: Sequence[Any], lr_decay: LrDecay | None) -> None:
    """``lr_decay`` and ``depth`` need each other: either alone would change nothing, silently."""
    for index, statement in enumerate(statements):
        for t, term in enumerate(getattr(statement, "terms", ())):
            if term.kind == "depth":
                if lr_decay is None:
                    raise PydanticCustomError(
                        "lr_decay_pairing", "depth without 'lr_decay D' changes nothing: add a line 'lr_decay 0.75'",
                        {"at": f"statements.{index}.terms.{t}"},
                    )
                return
    if lr_decay is not None:
        raise PydanticCustomError(
            "lr_decay_pairing", "lr_decay without a depth rule changes nothing: give parameters depths, as in "
            "'layer {example} depth i + 1'", {"at": "lr_decay", "example": "blocks.{i}.**"},
        )
