"""The validated rule file: frozen Pydantic models, the single source of truth.

Statements and the :class:`Spec` itself, with the checks that span a statement's
fields; terms are in :mod:`regdsl.term_nodes`, spans, patterns and selector atoms
in :mod:`regdsl.nodes`. Every node carries the span of source
text it came from (``pos``). Positions are provenance, not meaning: ``==`` and
``hash`` ignore them, so a spec equals the spec parsed from its own canonical text.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, TypeAdapter, ValidationError, model_validator
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
    kind_of,
    raw_items,
    readable,
    relevant_errors,
    validated_and_checked,
)
from .schedule_nodes import MAX_WHOLE, CosineStep, FromStep, Schedule, ScheduleStep, UntilStep, WarmupStep
from .space_nodes import ChoiceSpace, LogUniformSpace, Space, UniformSpace, bind_names
from .term_nodes import (
    MODULE_TERMS,
    NOT_REGULARIZERS,
    PARAM_TERMS,
    VALUE_TERMS,
    ActivityL1Term,
    ActivityL2Term,
    DecayTerm,
    GroupLassoTerm,
    L1Term,
    L2Term,
    LrMultTerm,
    MaxNormTerm,
    NoneTerm,
    OrthogonalTerm,
    Term,
    ValueTerm,
    kind_label,
)

__all__ = [
    "MAX_WHOLE",
    "MODULE_TERMS",
    "NOT_REGULARIZERS",
    "PARAM_TERMS",
    "VALUE_TERMS",
    "ActivityL1Term",
    "ActivityL2Term",
    "AllAtom",
    "Atom",
    "BiasAtom",
    "ChoiceSpace",
    "CosineStep",
    "DecayTerm",
    "DepthCapture",
    "DepthLast",
    "DepthNumber",
    "DepthTerm",
    "EmbeddingAtom",
    "FromStep",
    "GroupLassoTerm",
    "L1Term",
    "L2Term",
    "LayerAtom",
    "LogUniformSpace",
    "LrDecay",
    "LrMultTerm",
    "MaxNormTerm",
    "NoneTerm",
    "NormAtom",
    "OrthogonalTerm",
    "Pattern",
    "Schedule",
    "ScheduleStep",
    "Selector",
    "Space",
    "Span",
    "Term",
    "TypeAtom",
    "UniformSpace",
    "UntilStep",
    "ValueTerm",
    "WarmupStep",
    "error_code",
    "kind_label",
    "relevant_errors",
]

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .compiler import Regularizer


# ---------------------------------------------------------------- statements


class Rule(Node):
    """A selector and the terms it applies, in file order."""

    kind: Literal["rule"] = "rule"
    selector: Selector
    terms: tuple[Term, ...] = Field(min_length=1)

    @model_validator(mode="wrap")
    @classmethod
    def _checked(cls, data: Any, handler: Any) -> Any:
        checks = (_each_kind_once, _modules_for_activity, _captures_bound)
        return validated_and_checked(cls.__name__, data, handler, checks, _lenient_rule)


_TERM: TypeAdapter[Any] = TypeAdapter(Term)


def _lenient_rule(data: Any) -> Any:
    try:
        selector = Selector.model_validate(data.get("selector") if isinstance(data, Mapping) else None)
    except ValidationError:
        selector = None
    return SimpleNamespace(selector=selector, terms=[readable(_TERM, term, (*VALUE_TERMS, "none")) for term in raw_items(data, "terms")])


def _each_kind_once(rule: Any) -> None:
    seen: set[str] = set()
    for index, term in enumerate(rule.terms):
        if term.kind in seen:
            raise PydanticCustomError(
                "duplicate_term",
                "term '{kind}' appears twice in one rule; write it once",
                {"kind": kind_label(term.kind), "at": f"terms.{index}"},
            )
        if term.kind is not None:
            seen.add(term.kind)


def _modules_for_activity(rule: Any) -> None:
    activity = next((t for t in rule.terms if t.kind in MODULE_TERMS), None)
    atoms = rule.selector.atoms if rule.selector is not None else ()
    bias = next((i for i, a in enumerate(atoms) if a.kind == "bias"), None)
    if activity is not None and bias is not None:
        raise PydanticCustomError(
            "selector",
            "'{term}' penalizes module outputs, but 'bias' selects parameters, never a module",
            {"term": kind_label(activity.kind), "at": f"selector.atoms.{bias}"},
        )


def _captures_bound(rule: Any) -> None:
    # Which captures a rule may hold turns on its whole selector and its depth term: neither may have failed.
    if rule.selector is not None and not any(t.kind == "depth" and hasattr(t, "failed") for t in rule.terms):
        check_captures(rule.selector, rule.terms)


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
            if space.ref and defined.get(name) != space.copied({"ref": False}):
                raise PydanticCustomError(
                    "space",
                    "search space '{name}' is used here with other values than where it is defined",
                    {"name": name, "at": "lr_decay.factor" if si < 0 else f"statements.{si}.terms.{ti}.{_field}"},
                )
        return self

    def _meaning(self) -> tuple[Any, ...]:
        return (self.statements, self.lr_decay)

    @model_validator(mode="wrap")
    @classmethod
    def _checked(cls, data: Any, handler: Any) -> Any:
        return validated_and_checked(cls.__name__, data, handler, (_depth_with_lr_decay,), _lenient_spec)

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

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Spec:
        """As :meth:`Node.model_copy`; the copy keeps :attr:`source` while its statements still stand where
        the text has them (each at its index and span, with the same selector: a changed strength), so
        a diagnostic quotes the line it points at. Statements from another text drop it."""
        copy = super().model_copy(update=update, deep=deep)
        if update and copy._source is not None and not _in_place(self.statements, copy.statements):
            copy._source = None
        return copy

    @property
    def source(self) -> str | None:
        """The text this spec was parsed from, when it came from text (for a spec with its search spaces
        valued, ``with_values`` or a trial's, the text of the spec it was made from: its positions point there)."""
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
                        message=f"{_where(e) or 'spec'}: {e['msg']}",
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


def _where(error: Any) -> str:
    # A check names the offending element itself ("at"), finer than the node it checks.
    at = (error.get("ctx") or {}).get("at")
    return ".".join(map(str, [*error["loc"], *([] if at is None else [at])]))


def _lenient_spec(data: Any) -> Any:
    # Pairing depth with lr_decay needs only the kinds of the terms and whether lr_decay is there.
    statements = [
        SimpleNamespace(terms=[SimpleNamespace(kind=kind_of(term)) for term in raw_items(statement, "terms")])
        for statement in raw_items(data, "statements")
    ]
    lr_decay = data.get("lr_decay") if isinstance(data, Mapping) else None
    return SimpleNamespace(statements=statements, lr_decay=lr_decay)


def _depth_with_lr_decay(spec: Any) -> None:
    check_lr_decay(spec.statements, spec.lr_decay)


def _in_place(before: tuple[Statement, ...], after: tuple[Statement, ...]) -> bool:
    """Whether every statement of ``after`` stands where one of ``before`` did: the same index, span and selector."""
    return len(after) <= len(before) and all(
        a.pos == b.pos and a.selector == b.selector for a, b in zip(after, before)
    )
