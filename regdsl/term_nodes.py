"""The spec's term nodes: one per kind of term (``l2``, ``group_lasso``, ``max_norm``, ...),
each with its documented formula and the checks on its numbers, and the tuples that group
the kinds. Statements and the :class:`~regdsl.spec.Spec` are :mod:`regdsl.spec`'s."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from .depth_nodes import DepthTerm
from .nodes import Node
from .schedule_nodes import Schedule, _check_strength, _whole_number
from .space_nodes import SPACE_TYPES, Value, check_value


def kind_label(kind: str) -> str:
    """How the language writes a kind: ``activity_l1`` is ``activity l1``."""
    return kind.replace("_l", " l") if kind.startswith("activity_") else kind


class _Valued(Node):
    """A term with a number that may be a search space (:mod:`regdsl.space_nodes`)."""

    # Set on the copies regdsl.spaces.stand_in makes: the space a stand-in value replaced.
    _space: Any = PrivateAttr(default=None)
    _space_name: str | None = PrivateAttr(default=None)  # its name in spec.spaces(): which space, of equal ones

    @property
    def space(self) -> Any:
        """The search space this term's value is drawn from, or None for a plain number."""
        value = self.value  # type: ignore[attr-defined]
        return value if isinstance(value, SPACE_TYPES) else self._space


class _Strength(_Valued):
    strength: Value
    schedule: Schedule = Schedule()

    @field_validator("strength")
    @classmethod
    def _finite_nonnegative(cls, value: Any) -> Any:
        return check_value(value, _check_strength)

    @property
    def value(self) -> float:
        return self.strength


class DecayTerm(_Strength):
    """Optimizer weight decay: the parameter group's ``weight_decay``."""

    kind: Literal["decay"] = "decay"


class L2Term(_Strength):
    """Loss penalty ``strength/2 * sum((w - w0)**2)``, ``w0`` = 0, the initial weights or a reference."""

    kind: Literal["l2"] = "l2"
    to: Literal["init", "ref"] | None = None


class L1Term(_Strength):
    """Loss penalty ``strength * sum(|w|)``; with ``prox``, a soft-threshold after each optimizer step."""

    kind: Literal["l1"] = "l1"
    prox: bool = False


def _dim(value: Any) -> int:
    return _whole_number(
        value, "dim", "dim must be a whole number, got {value}", "dim", "dim is out of range: |dim| is at most 2**63 - 1"
    )


class GroupLassoTerm(_Strength):
    """Loss penalty ``strength * sum_i ||w_i||_2`` over the slices ``w_i`` along ``dim``."""

    kind: Literal["group_lasso"] = "group_lasso"
    dim: int = 0

    @field_validator("dim", mode="before")
    @classmethod
    def _whole(cls, value: float) -> int:
        return _dim(value)


class OrthogonalTerm(_Strength):
    """Loss penalty ``strength * ||G - I||_F^2``, G the smaller Gram matrix of the weight as (out, -1)."""

    kind: Literal["orthogonal"] = "orthogonal"


class ActivityL1Term(_Strength):
    """Penalty on a module's output: ``strength * mean over batch of sum(|a|)``."""

    kind: Literal["activity_l1"] = "activity_l1"


class ActivityL2Term(_Strength):
    """Penalty on a module's output: ``strength/2 * mean over batch of sum(a**2)``."""

    kind: Literal["activity_l2"] = "activity_l2"


def _check_norm(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise PydanticCustomError("strength", "max_norm must be a finite number > 0, got {value}", {"value": value})
    return value


class MaxNormTerm(_Valued):
    """Constraint: after each optimizer step, slices along ``dim`` with L2 norm above ``norm`` are scaled to it."""

    kind: Literal["max_norm"] = "max_norm"
    norm: Value
    dim: int = 0

    @field_validator("norm")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        return check_value(value, _check_norm)

    @field_validator("dim", mode="before")
    @classmethod
    def _whole(cls, value: float) -> int:
        return _dim(value)

    @property
    def value(self) -> float:
        return self.norm


class LrMultTerm(_Valued):
    """The group's learning rate is ``factor`` times the base lr."""

    kind: Literal["lr_mult"] = "lr_mult"
    factor: Value

    @field_validator("factor")
    @classmethod
    def _finite_nonnegative(cls, value: Any) -> Any:
        return check_value(value, lambda v: _check_strength(v, "lr_mult"))

    @property
    def value(self) -> float:
        return self.factor


class NoneTerm(Node):
    """Clears every regularization term earlier rules set on the matched parameters."""

    kind: Literal["none"] = "none"


ValueTerm = (
    DecayTerm | L1Term | L2Term | GroupLassoTerm | OrthogonalTerm | MaxNormTerm | ActivityL1Term | ActivityL2Term | LrMultTerm
    | DepthTerm
)
Term = Annotated[ValueTerm | NoneTerm, Field(discriminator="kind")]

# Term kinds that carry a value, in the order explain() and the docs list them.
VALUE_TERMS: tuple[str, ...] = (
    "decay", "l1", "l2", "group_lasso", "orthogonal", "max_norm", "lr_mult", "depth", "activity_l1", "activity_l2"
)
# Kinds that act on a module's output rather than on its parameters.
MODULE_TERMS: tuple[str, ...] = ("activity_l1", "activity_l2")
PARAM_TERMS: tuple[str, ...] = tuple(k for k in VALUE_TERMS if k not in MODULE_TERMS)
# Kinds that 'exclude' and 'none' leave alone: optimizer settings, not regularizers.
NOT_REGULARIZERS: tuple[str, ...] = ("lr_mult", "depth")
