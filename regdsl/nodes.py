"""The spec's building blocks: source spans, the base node, name patterns and selector atoms.

Every node carries the span of source text it came from (``pos``). Positions
are provenance, not meaning: ``==`` and ``hash`` ignore them, so a spec equals
the spec parsed from its own canonical text. Terms (:mod:`regdsl.term_nodes`), schedules
and statements (:mod:`regdsl.spec`) are built on these, and check across their fields with
:func:`validated_and_checked`.
"""

from __future__ import annotations

import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticCustomError, core_schema

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

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Any:
        """A copy, validated again when ``update`` changes fields: pydantic's own copy validates
        nothing, so ``spec.model_copy(update=...)`` could make a spec the text would refuse (a
        negative strength, a term twice) and compile it."""
        unknown = sorted(set(update or ()) - set(type(self).model_fields))
        if unknown:  # pydantic's copy would take them as attributes the model never reads
            raise TypeError(
                f"{type(self).__name__}.model_copy(update=...) got {', '.join(map(repr, unknown))}, not a field of it; "
                f"its fields: {', '.join(type(self).model_fields)}"
            )
        copied = super().model_copy(update=update, deep=deep)
        if not update:
            return copied
        checked = type(self).model_validate({name: getattr(copied, name) for name in type(self).model_fields})
        if copied.__pydantic_private__ is not None:  # the source text, a valued term's space: kept
            checked.__pydantic_private__ = dict(copied.__pydantic_private__)
        return checked

    def copied(self, update: Mapping[str, Any]) -> Any:
        """Pydantic's copy, not validated again: for regdsl's own changes that keep a spec valid
        (a search space replaced by a value inside it), and keep each node's private state."""
        return BaseModel.model_copy(self, update=update)

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


# ---------------------------------------------------------------- checks across fields

# Pydantic's own error types: re-raised by name, where a custom type needs a PydanticCustomError.
_PYDANTIC_ERROR_TYPES = frozenset(typing.get_args(core_schema.ErrorType))


def validated_and_checked(
    title: str, data: Any, handler: Callable[[Any], Any], checks: Sequence[Callable[[Any], None]], lenient: Callable[[Any], Any]
) -> Any:
    """Validate ``data`` with ``handler``, then run ``checks`` (each raises a PydanticCustomError,
    positioned by its ``at``), reporting every error of both at once.

    Pydantic skips a model's after-validators when one of its fields fails, so a check written
    as one shows only once every field is fixed: ``all l2 -1 l2 2`` would hide the repeated
    ``l2`` until the -1 was fixed. Here the checks also run when a field fails, on
    ``lenient(data)``: the part of the raw data that can be read (None when none can).
    """
    failed: ValidationError | None = None
    try:
        node = subject = handler(data)
    except ValidationError as exc:
        failed, subject = exc, lenient(data)
    problems: list[Any] = []
    for check in checks if subject is not None else ():
        try:
            check(subject)
        except PydanticCustomError as problem:
            problems.append({"type": problem, "loc": (), "input": data})
    if failed is not None and not problems:
        raise failed
    if problems:
        earlier = [] if failed is None else [_line_error(e) for e in failed.errors()]
        raise ValidationError.from_exception_data(title, [*earlier, *problems])
    return node


def _line_error(error: Any) -> Any:
    """One of ``ValidationError.errors()`` as ``from_exception_data`` takes it back, unchanged."""
    ctx = error.get("ctx") or {}
    out = {"loc": error["loc"], "input": error["input"]}
    if error["type"] in _PYDANTIC_ERROR_TYPES:
        return {**out, "type": error["type"], **({"ctx": ctx} if ctx else {})}
    # The message is rendered already: a placeholder a quoted value put in it must not be filled again.
    kept = {key: value for key, value in ctx.items() if f"{{{key}}}" not in error["msg"]}
    return {**out, "type": PydanticCustomError(error["type"], error["msg"], kept)}


def kind_of(raw: Any) -> str | None:
    """The ``kind`` raw model input gives a node, if it gives one."""
    kind = raw.get("kind") if isinstance(raw, Mapping) else getattr(raw, "kind", None)
    return kind if isinstance(kind, str) else None


def readable(adapter: TypeAdapter[Any], raw: Any, kinds: Sequence[str]) -> Any:
    """``raw`` validated as one node, or, when it fails, a stand-in that knows only its ``kind``
    (None unless one of ``kinds``: a kind no node has is its own error, not a repeat)."""
    try:
        return adapter.validate_python(raw)
    except ValidationError:
        kind = kind_of(raw)
        return SimpleNamespace(kind=kind if kind in kinds else None, failed=True)


def raw_items(data: Any, field: str) -> list[Any]:
    """The elements of a sequence field of raw model input; none when it holds no sequence."""
    items = data.get(field) if isinstance(data, Mapping) else getattr(data, field, None)
    return list(items) if isinstance(items, (list, tuple)) else []


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
