"""Search spaces in a spec: their names, values for them, Optuna and grids (docs/language.md,
"Search spaces").

A space's name is the one written with ``as NAME``; an unnamed space is named after its term and
line, ``"l2:6"`` (``"l2:6:31"`` when two ``l2`` spaces share line 6), the label ``reg.values()``
gives the same term. Every term that writes a name shares that space's one value.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import RegCompileError, RegUsageError, model_diagnostic
from .space_nodes import SPACE_TYPES, VALUE_FIELDS, ChoiceSpace, LogUniformSpace

if TYPE_CHECKING:  # pragma: no cover
    from .spec import Spec

# (statement index, term index, field, the space, its name); the file's lr_decay is statement -1.
Use = tuple[int, int, str, Any, str]
LR_DECAY = -1


def _term_at(spec: Spec, si: int, ti: int) -> Any:
    return spec.lr_decay if si == LR_DECAY else spec.statements[si].terms[ti]  # type: ignore[union-attr]


def _uses(spec: Spec) -> list[Use]:
    found = [
        (si, ti, field, value)
        for si, statement in enumerate(spec.statements)
        for ti, term in enumerate(getattr(statement, "terms", ()))
        for field in VALUE_FIELDS
        if isinstance(value := getattr(term, field, None), SPACE_TYPES)
    ]
    if spec.lr_decay is not None and isinstance(spec.lr_decay.factor, SPACE_TYPES):
        found.insert(0, (LR_DECAY, 0, "factor", spec.lr_decay.factor))  # where the canonical text puts it

    def auto(si: int, ti: int) -> str:
        term = _term_at(spec, si, ti)
        return f"{term.kind}:{term.pos.line}" if term.pos is not None else f"{term.kind}:{si + 1}"

    counts: dict[str, int] = {}
    for si, ti, _, space in found:
        if space.name is None:
            counts[auto(si, ti)] = counts.get(auto(si, ti), 0) + 1
    uses = []
    for si, ti, field, space in found:
        name = space.name
        if name is None:
            name = auto(si, ti)
            if counts[name] > 1:  # two unnamed spaces of one kind on one line: the column tells them apart
                term = _term_at(spec, si, ti)
                name += f":{term.pos.column if term.pos is not None else ti + 1}"
        uses.append((si, ti, field, space, name))
    return uses


def unnamed(spec: Spec) -> list[tuple[str, Any]]:
    """``(name, space)`` of every space written without ``as NAME``, in file order: named by its line."""
    return [(name, space) for *_, space, name in _uses(spec) if space.name is None and not space.ref]


def spaces(spec: Spec) -> dict[str, Any]:
    """``{name: space}``, one entry per space (a named one once, however many terms use it), in file order."""
    return {name: space for *_, space, name in _uses(spec) if not space.ref}


def _replaced(spec: Spec, value_of: Callable[[str, Any], float], keep_space: bool) -> Spec:
    """``spec`` with every space replaced by ``value_of(name, space)``; ``keep_space`` records the
    space on the new term (:attr:`regdsl.term_nodes._Valued.space`) for ``explain`` to show."""
    uses = _uses(spec)
    if not uses:
        return spec
    statements = list(spec.statements)
    terms_of: dict[int, list[Any]] = {}
    lr_decay = spec.lr_decay
    for si, ti, field, space, name in uses:
        if si == LR_DECAY:
            lr_decay = spec.lr_decay.copied({field: value_of(name, space)})  # type: ignore[union-attr]
            lr_decay._space, lr_decay._space_name = (space, name) if keep_space else (None, None)
            continue
        terms = terms_of.setdefault(si, list(statements[si].terms))  # type: ignore[union-attr]
        term = terms[ti].copied({field: value_of(name, space)})
        term._space, term._space_name = (space, name) if keep_space else (None, None)
        terms[ti] = term
    for si, terms in terms_of.items():
        statements[si] = statements[si].copied({"terms": tuple(terms)})
    out = spec.copied({"statements": tuple(statements), "lr_decay": lr_decay})
    # Its nodes keep their positions in the file's text: a diagnostic about a valued spec (a trial's)
    # shows the line as written, with its caret.
    out._source = spec._source
    return out


def stand_in(spec: Spec) -> Spec:
    """``spec`` with each space at its stand-in value, the space kept beside it: what ``check``
    and ``explain`` resolve a file with spaces with. Never compiled (see :func:`require_values`)."""
    # lr_decay is off at 1, as a strength is at 0: its choice stands in with the first other one,
    # wherever else the same named space is used (one space, one value).
    lr_decay = {name for si, *_, name in _uses(spec) if si == LR_DECAY}

    def value(name: str, space: Any) -> float:
        if name in lr_decay and isinstance(space, ChoiceSpace):
            return next((v for v in space.choices if v != 1), space.stand_in)
        return space.stand_in

    return _replaced(spec, value, keep_space=True)


def with_values(spec: Spec, values: Mapping[str, float]) -> Spec:
    """A concrete spec: every space replaced by ``values[name]``, which must lie in the space."""
    if not isinstance(values, Mapping):
        raise TypeError(f"with_values() takes a mapping {{name: value}}, not {type(values).__name__}")
    known = spaces(spec)
    problems = [f"'{n}' names no search space of the rules (they have: {_names(known)})" for n in values if n not in known]
    problems += [f"no value for '{n}' ({s})" for n, s in known.items() if n not in values]
    for name, space in known.items():
        if name not in values:
            continue
        if not _number(values[name]):
            problems.append(f"'{name}' takes a number (int or float), not {type(values[name]).__name__}")
        elif not _inside(space, values[name]):
            problems.append(f"{values[name]!r} for '{name}' is outside {space!s}")
    if problems:
        raise RegUsageError("spec.with_values: " + "; ".join(problems))
    return _replaced(spec, lambda name, space: _clamped(space, float(values[name])), keep_space=False)


def _clamped(space: Any, value: float) -> float:
    # A value within _inside's slack of a bound is the bound: a strength never goes below 0.
    return value if isinstance(space, ChoiceSpace) else min(max(value, space.low), space.high)


def _number(value: Any) -> bool:
    # numbers.Real: numpy's scalars too (Optuna's best_params may hold them); a 0-dim tensor is not one.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _inside(space: Any, value: Any) -> bool:
    # Optuna's log-uniform draws can land a rounding step outside exp(log(b)): each bound gets a slack of
    # its own size (a slack scaled by the upper bound let 0 stand for loguniform(1e-8, 1e4)'s 1e-8).
    if isinstance(space, ChoiceSpace):
        return space.contains(float(value))
    return space.low - 1e-12 * abs(space.low) <= value <= space.high + 1e-12 * abs(space.high)


def _names(known: Mapping[str, Any]) -> str:
    return ", ".join(f"'{n}'" for n in known) or "none"


def require_values(spec: Spec) -> None:
    """Raise, naming each space and where it stands, when ``spec`` still has search spaces."""
    uses = [u for u in _uses(spec) if not u[3].ref]
    if not uses:
        return
    diagnostics = [
        model_diagnostic(
            spec,
            space.pos,
            "RD011",
            f"search space '{name}' ({space!s}) has no value: compile spec.with_values({{...}}), or pass trial= to regdsl.compile",
            kind="compile",
        )
        for *_, space, name in uses
    ]
    # An error diagnostic at compile, as every other: RegCompileError (docs/diagnostics.md).
    raise RegCompileError(diagnostics)


def search_space(spec: Spec) -> dict[str, Any]:
    """``{name: optuna.distributions.BaseDistribution}`` for every space of ``spec``."""
    try:
        from optuna.distributions import CategoricalDistribution, FloatDistribution
    except ImportError:
        raise RegUsageError("search_space() needs Optuna: pip install 'regdsl[optuna]'") from None
    out: dict[str, Any] = {}
    for name, space in spaces(spec).items():
        if isinstance(space, ChoiceSpace):
            out[name] = CategoricalDistribution(space.choices)
        else:
            out[name] = FloatDistribution(space.low, space.high, log=isinstance(space, LogUniformSpace))
    return out


def suggest(spec: Spec, trial: Any) -> dict[str, float]:
    """One value per space from an Optuna trial (``trial.suggest_float``/``suggest_categorical``), in file order."""
    if not all(callable(getattr(trial, m, None)) for m in ("suggest_float", "suggest_categorical")):
        raise TypeError(
            f"trial= takes an Optuna trial (with suggest_float and suggest_categorical), not {type(trial).__name__}"
        )
    values: dict[str, float] = {}
    for name, space in spaces(spec).items():
        if isinstance(space, ChoiceSpace):
            values[name] = trial.suggest_categorical(name, list(space.choices))
        else:
            values[name] = trial.suggest_float(name, space.low, space.high, log=isinstance(space, LogUniformSpace))
    return values


def grid_points(space: Any, n: int) -> tuple[float, ...]:
    """``n`` points spanning an interval, ends included (log-spaced for loguniform), each once (fewer for an
    interval holding fewer than ``n`` floats); a choice's own values."""
    if isinstance(space, ChoiceSpace):
        return space.choices
    if n == 1:
        return (space.stand_in,)
    low, high = space.low, space.high
    if isinstance(space, LogUniformSpace):
        lo, hi = math.log(low), math.log(high)
        inner = [math.exp(lo * (1 - i / (n - 1)) + hi * i / (n - 1)) for i in range(1, n - 1)]
    else:  # weights, not high - low: that difference overflows across the whole float range
        inner = [low * (1 - i / (n - 1)) + high * i / (n - 1) for i in range(1, n - 1)]
    # Rounding may step just outside the bounds; the ends are exactly as written. An interval holding
    # fewer than n floats (uniform(0, 1e-323)) gives each once: a grid point twice is a trial run twice.
    return tuple(dict.fromkeys((low, *(min(max(v, low), high) for v in inner), high)))


def grid(spec: Spec, n: int = 5) -> Iterator[dict[str, float]]:
    """Every combination of ``n`` points per interval space (fewer where it holds fewer floats) and every value of each ``choice``,
    as ``{name: value}`` for :meth:`Spec.with_values`, the first space varying slowest. Its arguments
    are checked at the call, not at the first ``next()``."""
    from .spec import Spec

    if not isinstance(spec, Spec):
        raise TypeError(f"grid() takes a Spec (regdsl.parse(text) or regdsl.load(path)), not a {type(spec).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RegUsageError(f"grid: n must be a whole number >= 1, got {n!r}")
    known = spaces(spec)
    axes = [grid_points(space, n) for space in known.values()]
    return (dict(zip(known, combination)) for combination in itertools.product(*axes))
