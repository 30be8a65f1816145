"""The spec's building blocks: source spans, the base node, name patterns and selector atoms.

Every node carries the span of source text it came from (``pos``). Positions
are provenance, not meaning: ``==`` and ``hash`` ignore them, so a spec equals
the spec parsed from its own canonical text. :mod:`regdsl.spec` builds terms,
schedules and statements on these.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .glob import GlobError, glob_source


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
    # A "too short" is an echo when another error lies at or under its location. Sets, not
    # a pairwise search: a file of thousands of bad rules has thousands of echoes.
    under = {e["loc"][:i] for e in errors for i in range(len(e["loc"]))}
    at = Counter(e["loc"] for e in errors)
    return [e for e in errors if not (e["type"] == "too_short" and (e["loc"] in under or at[e["loc"]] > 1))]


_ERROR_CODES = {
    "strength": "RD004", "pattern": "RD005", "duplicate_term": "RD006", "schedule": "RD007", "dim": "RD007",
    "selector": "RD008", "space": "RD010", "capture": "RD012", "depth": "RD013", "lr_decay": "RD013",
    "lr_decay_pairing": "RD013", "space_unbound": "RD010", "space_duplicate": "RD010",
}


def error_code(error: Any) -> str:
    """The diagnostic code of one Pydantic error raised by these models."""
    return _ERROR_CODES.get(error["type"], "RD009")


# ---------------------------------------------------------------- patterns

class Pattern(Node):
    """A dotted-path glob: ``*`` and ``?`` stay inside one segment, ``**`` spans segments."""

    text: str

    @field_validator("text")
    @classmethod
    def _check(cls, text: str) -> str:
        # The translation that selection compiles is the validator: a glob that passes here always compiles.
        try:
            glob_source(text)
        except GlobError as exc:
            raise PydanticCustomError("pattern", "{problem}", {"problem": str(exc)}) from None
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
    """Parameters owned directly by a module whose class, or a module base class of it, matches (short or qualified name)."""

    kind: Literal["type"] = "type"
    patterns: tuple[Pattern, ...] = Field(min_length=1)


class BiasAtom(Node):
    """Parameters whose own name is ``bias`` or ends in ``_bias`` (``in_proj_bias``; not ``bias_k``)."""

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
