"""The validated rule file: frozen Pydantic models, the single source of truth.

Every node carries the span of source text it came from (``pos``). Positions
are provenance, not meaning: ``==`` and ``hash`` ignore them, so a spec equals
the spec parsed from its own canonical text.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .compiler import Regularizer


class Span(BaseModel):
    """A 1-based, end-exclusive range of source text."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    line: int = Field(ge=1)
    column: int = Field(ge=1)
    end_line: int = Field(ge=1)
    end_column: int = Field(ge=1)

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    pos: Span | None = Field(default=None, description="Source span; ignored by == and hash.")

    def _meaning(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields if name != "pos")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._meaning() == other._meaning()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._meaning()))


def relevant_errors(exc: ValidationError) -> list[Any]:
    """Pydantic's errors minus the "too short" a tuple reports when its only element failed."""
    errors = exc.errors()
    return [
        e
        for e in errors
        if not (e["type"] == "too_short" and any(o is not e and o["loc"][: len(e["loc"])] == e["loc"] for o in errors))
    ]


_ERROR_CODES = {"strength": "RD004", "pattern": "RD005", "duplicate_term": "RD006"}


def error_code(error: Any) -> str:
    """The diagnostic code of one Pydantic error raised by these models."""
    return _ERROR_CODES.get(error["type"], "RD009")


# ---------------------------------------------------------------- patterns

_CLASS = re.compile(r"\[!?\]?[^\]]*\]")


class Pattern(Node):
    """A dotted-path glob: ``*`` and ``?`` stay inside one segment, ``**`` spans segments."""

    text: str

    @field_validator("text")
    @classmethod
    def _check(cls, text: str) -> str:
        if not text:
            raise PydanticCustomError("pattern", "empty name pattern")
        bad = [c for c in text if c in '"\r\n' or not c.isprintable()]
        if bad:
            raise PydanticCustomError("pattern", "name pattern {text} contains {char}", {"text": repr(text), "char": repr(bad[0])})
        for segment in text.split("."):
            if not segment:
                raise PydanticCustomError(
                    "pattern", "empty path segment in {text} (a leading, trailing or doubled '.')", {"text": repr(text)}
                )
            if "**" in segment and segment != "**":
                raise PydanticCustomError(
                    "pattern", "'**' must be a whole path segment, as in 'a.**.b', not {segment}", {"segment": repr(segment)}
                )
            rest = _CLASS.sub("", segment)
            if "[" in rest or "]" in rest:
                raise PydanticCustomError(
                    "pattern", "unbalanced '[' or ']' in {segment}; a character class is '[abc]'", {"segment": repr(segment)}
                )
        return text


# ---------------------------------------------------------------- selector atoms


class AllAtom(Node):
    """Every trainable parameter."""

    kind: Literal["all"] = "all"


class LayerAtom(Node):
    """Parameters whose full name, or the name of a module containing them, matches a pattern."""

    kind: Literal["layer"] = "layer"
    patterns: tuple[Pattern, ...] = Field(min_length=1)


class TypeAtom(Node):
    """Parameters owned directly by a module whose class (short or qualified name) matches."""

    kind: Literal["type"] = "type"
    patterns: tuple[Pattern, ...] = Field(min_length=1)


class BiasAtom(Node):
    """Parameters whose own name is exactly ``bias``."""

    kind: Literal["bias"] = "bias"


class NormAtom(Node):
    """Parameters owned directly by normalization modules."""

    kind: Literal["norm"] = "norm"


class EmbeddingAtom(Node):
    """Weights of ``nn.Embedding`` and ``nn.EmbeddingBag``."""

    kind: Literal["embedding"] = "embedding"


Atom = Annotated[
    AllAtom | LayerAtom | TypeAtom | BiasAtom | NormAtom | EmbeddingAtom,
    Field(discriminator="kind"),
]


class Selector(Node):
    """Atoms that must all hold."""

    atoms: tuple[Atom, ...] = Field(min_length=1)


# ---------------------------------------------------------------- terms


class _Strength(Node):
    strength: float

    @field_validator("strength")
    @classmethod
    def _finite_nonnegative(cls, value: float) -> float:
        if not math.isfinite(value):
            raise PydanticCustomError("strength", "strength must be a finite number, got {value}", {"value": value})
        if value < 0:
            raise PydanticCustomError("strength", "strength must be >= 0, got {value}", {"value": value})
        return value + 0.0  # -0.0 becomes 0.0, so it prints as 0.0


class DecayTerm(_Strength):
    """Optimizer weight decay: the parameter group's ``weight_decay``."""

    kind: Literal["decay"] = "decay"


class L2Term(_Strength):
    """Loss penalty ``strength/2 * sum(w**2)``; gradient ``strength * w``."""

    kind: Literal["l2"] = "l2"


class L1Term(_Strength):
    """Loss penalty ``strength * sum(|w|)``."""

    kind: Literal["l1"] = "l1"


class NoneTerm(Node):
    """Clears every term earlier rules set on the matched parameters."""

    kind: Literal["none"] = "none"


Term = Annotated[DecayTerm | L2Term | L1Term | NoneTerm, Field(discriminator="kind")]

# Term kinds that carry a value, in the order explain() and the docs list them.
VALUE_TERMS: tuple[str, ...] = ("decay", "l1", "l2")

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
                    {"kind": term.kind, "at": index},
                )
            seen.add(term.kind)
        return terms


class Exclude(Node):
    """Parameters it selects get no term at all, wherever it stands in the file."""

    kind: Literal["exclude"] = "exclude"
    selector: Selector


Statement = Annotated[Rule | Exclude, Field(discriminator="kind")]


class Spec(Node):
    """A whole rule file. ``origin`` names the file it was read from (ignored by ==)."""

    statements: tuple[Statement, ...] = ()
    origin: str | None = None
    _source: str | None = PrivateAttr(default=None)

    def _meaning(self) -> tuple[Any, ...]:
        return (self.statements,)

    @property
    def source(self) -> str | None:
        """The text this spec was parsed from, when it came from text."""
        return self._source

    def to_source(self) -> str:
        """Canonical ``.reg`` text: one statement a line. ``parse(spec.to_source()) == spec``."""
        from .printer import format_statement

        return "".join(format_statement(s) + "\n" for s in self.statements)

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

    def compile(self, model: torch.nn.Module) -> Regularizer:
        """Resolve the rules against ``model``: see :class:`regdsl.Regularizer`."""
        from .compiler import Regularizer

        return Regularizer(self, model)
