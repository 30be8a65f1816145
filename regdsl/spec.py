"""The validated rule file: frozen Pydantic models, the single source of truth.

Schedules, terms, statements and the :class:`Spec` itself; spans, patterns and
selector atoms are in :mod:`regdsl.nodes`. Every node carries the span of source
text it came from (``pos``). Positions are provenance, not meaning: ``==`` and
``hash`` ignore them, so a spec equals the spec parsed from its own canonical text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

# The building blocks live in nodes.py; they are part of the spec's vocabulary, so importable from here too.
from .depth_nodes import DepthCapture, DepthLast, DepthNumber, DepthTerm, LrDecay, check_captures, check_lr_decay
from .nodes import (
    AllAtom,
    Atom,
    BiasAtom,
    EmbeddingAtom,
    LayerAtom,
    Node,
    NormAtom,
    Pattern,
    Selector,
    Span,
    TypeAtom,
    error_code,
    relevant_errors,
)
from .schedule_nodes import (
    MAX_WHOLE,
    CosineStep,
    FromStep,
    Schedule,
    ScheduleStep,
    UntilStep,
    WarmupStep,
    _check_strength,
    _whole_number,
)
from .space_nodes import SPACE_TYPES, ChoiceSpace, LogUniformSpace, Space, UniformSpace, Value, bind_names, check_value

__all__ = [
    "MAX_WHOLE",
    "AllAtom",
    "Atom",
    "BiasAtom",
    "ChoiceSpace",
    "CosineStep",
    "DepthCapture",
    "DepthLast",
    "DepthNumber",
    "DepthTerm",
    "EmbeddingAtom",
    "FromStep",
    "LayerAtom",
    "LogUniformSpace",
    "LrDecay",
    "NormAtom",
    "Pattern",
    "Schedule",
    "ScheduleStep",
    "Selector",
    "Space",
    "Span",
    "TypeAtom",
    "UniformSpace",
    "UntilStep",
    "WarmupStep",
    "error_code",
    "relevant_errors",
]

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .compiler import Regularizer


# ---------------------------------------------------------------- terms


def kind_label(kind: str) -> str:
    """How the language writes a kind: ``activity_l1`` is ``activity l1``."""
    return kind.replace("_l", " l") if kind.startswith("activity_") else kind


class _Valued(Node):
    """A term with a number that may be a search space (:mod:`regdsl.space_nodes`)."""

    # Set on the copies regdsl.spaces.stand_in makes: the space a stand-in value replaced.
    _space: Any = PrivateAttr(default=None)

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

# ---------------------------------------------------------------- statements


class Rule(Node):
    """A selector and the terms it applies, in file order."""

    kind: Literal["rule"] = "rule"
    selector: Selector
    terms: tuple[Term, ...] = Field(min_length=1)

    @field_validator("terms")
    @classmethod
    def _each_kind_once(cls, terms: tuple[Any, ...]) -> tuple[Any, ...]:
        seen: set[str] = set()
        for index, term in enumerate(terms):
            if term.kind in seen:
                raise PydanticCustomError(
                    "duplicate_term",
                    "term '{kind}' appears twice in one rule; write it once",
                    {"kind": kind_label(term.kind), "at": index},
                )
            seen.add(term.kind)
        return terms

    @model_validator(mode="after")
    def _modules_for_activity(self) -> Rule:
        activity = next((t for t in self.terms if t.kind in MODULE_TERMS), None)
        bias = next((i for i, a in enumerate(self.selector.atoms) if a.kind == "bias"), None)
        if activity is not None and bias is not None:
            raise PydanticCustomError(
                "selector",
                "'{term}' penalizes module outputs, but 'bias' selects parameters, never a module",
                {"term": kind_label(activity.kind), "at": f"selector.atoms.{bias}"},
            )
        check_captures(self.selector, self.terms)
        return self


class Exclude(Node):
    """Parameters it selects get no term at all, wherever it stands in the file."""

    kind: Literal["exclude"] = "exclude"
    selector: Selector

    @model_validator(mode="after")
    def _no_captures(self) -> Exclude:
        check_captures(self.selector, None)
        return self


Statement = Annotated[Rule | Exclude, Field(discriminator="kind")]


class Spec(Node):
    """A whole rule file. ``origin`` names the file it was read from (ignored by ==)."""

    statements: tuple[Statement, ...] = ()
    lr_decay: LrDecay | None = None
    origin: str | None = None
    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _bind_names(cls, data: Any) -> Any:
        # Bare names become copies of the spaces they name before any term validates its value.
        return bind_names(data)

    @model_validator(mode="after")
    def _refs_match(self) -> Spec:
        # JSON holds each use of a named space whole: every use must repeat its definition.
        from .spaces import _uses

        uses = _uses(self)
        defined = {space.name: space for *_, space, _ in uses if not space.ref}
        for si, ti, _field, space, name in uses:
            if space.ref and defined.get(name) != space.model_copy(update={"ref": False}):
                raise PydanticCustomError(
                    "space",
                    "search space '{name}' is used here with other values than where it is defined",
                    {"name": name, "at": "lr_decay.factor" if si < 0 else f"statements.{si}.terms.{ti}.{_field}"},
                )
        return self

    def _meaning(self) -> tuple[Any, ...]:
        return (self.statements, self.lr_decay)

    @model_validator(mode="after")
    def _depth_with_lr_decay(self) -> Spec:
        check_lr_decay(self.statements, self.lr_decay)
        return self

    def spaces(self) -> dict[str, Any]:
        """``{name: space}`` for every search space, in file order; unnamed ones are named
        ``"<term>:<line>"`` (see :mod:`regdsl.spaces`). Empty for a concrete spec."""
        from .spaces import spaces

        return spaces(self)

    def search_space(self) -> dict[str, Any]:
        """``{name: optuna distribution}`` for every search space (needs ``regdsl[optuna]``)."""
        from .spaces import search_space

        return search_space(self)

    def with_values(self, values: Mapping[str, float]) -> Spec:
        """The concrete spec with ``values[name]`` for each search space (each must lie inside its
        space, and every space needs one): ``spec.with_values(study.best_params).to_source()``."""
        from .spaces import with_values

        return with_values(self, values)

    @property
    def source(self) -> str | None:
        """The text this spec was parsed from, when it came from text."""
        return self._source

    def to_source(self) -> str:
        """Canonical ``.reg`` text: one statement a line. ``parse(spec.to_source()) == spec``."""
        from .printer import format_lr_decay, format_statement

        head = f"{format_lr_decay(self.lr_decay)}\n" if self.lr_decay is not None else ""
        return head + "".join(format_statement(s) + "\n" for s in self.statements)

    def to_json(self, **kwargs: Any) -> str:
        return self.model_dump_json(**kwargs)

    @classmethod
    def from_json(cls, data: str | bytes) -> Spec:
        """Inverse of :meth:`to_json`; invalid input raises ``RegValidationError``."""
        from .errors import Diagnostic, RegValidationError

        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise RegValidationError(
                [
                    Diagnostic(
                        line=0,
                        column=0,
                        message=f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}",
                        code=error_code(e),
                    )
                    for e in relevant_errors(exc)
                ]
            ) from None

    def compile(
        self, model: torch.nn.Module, reference: Mapping[str, torch.Tensor] | None = None, accumulation_steps: int = 1
    ) -> Regularizer:
        """Resolve the rules against ``model``: see :class:`regdsl.Regularizer`.

        ``reference`` (a state_dict) supplies ``w0`` for ``l2 ... to ref``; ``accumulation_steps``
        is the number of backward passes per optimizer step that ``penalty()`` is added to.
        """
        from .compiler import Regularizer

        return Regularizer(self, model, reference=reference, accumulation_steps=accumulation_steps)
