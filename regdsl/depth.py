"""Depths and ``lr_decay``: each parameter's depth and its learning-rate factor.

The formula (docs/language.md, "Depth and lr_decay"): a parameter's lr multiplier is
``lr_mult · D ** (deepest − depth)``, ``D`` the file's ``lr_decay`` and ``deepest`` the largest
depth of any parameter of the model, frozen ones included, so freezing a block never moves
anyone's factor. A parameter no depth rule reaches counts as ``deepest`` (factor 1), as timm's
``layer_map.get(name, layer_max)`` does; ``check`` warns about each trainable one (RD206).

Which rule gives a parameter its depth is the cascade's rule for ``lr_mult``: the last one in
file order that selects it; ``exclude`` and ``none`` leave depths alone. Unlike the cascade,
depths are read for every parameter, frozen ones too, since they decide ``deepest``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import Diagnostic, quoted
from .findings import model_diagnostic
from .glob import capture_regex, glob_captures
from .schedule_nodes import MAX_WHOLE
from .spec import DepthCapture, DepthLast, DepthNumber, DepthTerm, LayerAtom, Rule, Spec


@dataclass(frozen=True)
class Depths:
    """Per table entry (frozen ones too) its depth, or None where no depth rule reaches it."""

    decay: float  # the file's lr_decay
    deepest: int  # the largest depth of any parameter of the model
    depth: tuple[int | None, ...]
    setter: tuple[int | None, ...]  # index of the statement that set each depth

    def of(self, i: int) -> int:
        """Entry ``i``'s depth as the formula reads it: ``deepest`` where no rule gave one."""
        depth = self.depth[i]
        return self.deepest if depth is None else depth

    def factor(self, i: int) -> float:
        """``D ** (deepest − depth)``: entry ``i``'s lr multiplier before its ``lr_mult``."""
        # The expression timm's param_groups_layer_decay evaluates, so the floats are the same.
        return self.decay ** (self.deepest - self.of(i))


def depth_term(statement: Any) -> DepthTerm | None:
    if not isinstance(statement, Rule):
        return None
    return next((t for t in statement.terms if isinstance(t, DepthTerm)), None)


def resolve_depths(spec: Spec, table: Any, matches: Sequence[Sequence[int]]) -> Depths | None:
    """Every entry's depth from the rules; None for a file without ``lr_decay`` (then without depths)."""
    if spec.lr_decay is None:
        return None
    size = len(table.entries)
    setter: list[int | None] = [None] * size
    for index, statement in enumerate(spec.statements):
        if depth_term(statement) is not None:
            for i in matches[index]:
                setter[i] = index
    depth: list[int | None] = [None] * size
    lasts: list[int] = []
    for i, index in enumerate(setter):
        if index is None:
            continue
        statement = spec.statements[index]
        expr = depth_term(statement).expr  # type: ignore[union-attr]
        if isinstance(expr, DepthNumber):
            depth[i] = expr.value
        elif isinstance(expr, DepthCapture):
            number = captured(statement, expr.name, table.entries[i])
            # A capture past 2**63 - 1 stays past it whatever its offset: RD108 then names this rule.
            depth[i] = number + expr.offset if number <= MAX_WHOLE else number
        else:
            lasts.append(i)
    numbered = [d for d in depth if d is not None and d <= MAX_WHOLE]  # one past it is RD108's alone
    last = max(numbered, default=-1) + 1
    for i in lasts:
        expr = depth_term(spec.statements[setter[i]]).expr  # type: ignore[arg-type, union-attr]
        assert isinstance(expr, DepthLast)
        depth[i] = last + expr.offset
    deepest = max((d for d in depth if d is not None), default=0)
    return Depths(spec.lr_decay.factor, deepest, tuple(depth), tuple(setter))


def captured(statement: Rule, name: str, entry: Any) -> int:
    """The number capture ``name`` matched in the entry's name, in the first of the binding layer
    atom's patterns that matches; a tied tensor is read by its names in registration order."""
    subjects = dict.fromkeys((*entry.names, *entry.tensors))
    for atom in statement.selector.atoms:
        if isinstance(atom, LayerAtom) and name in glob_captures(atom.patterns[0].text):
            for pattern in atom.patterns:
                regex = capture_regex(pattern.text)
                for subject in subjects:
                    match = regex.fullmatch(subject)
                    if match is not None:
                        # A depth is at most 2**63 - 1 (RD108), and int() refuses over 4,300 digits.
                        digits = match.group(name).lstrip("0") or "0"
                        return int(digits) if len(digits) <= len(str(MAX_WHOLE)) else MAX_WHOLE + 1
    raise AssertionError(f"{entry.names} was selected by line {statement.pos} but no pattern binds '{name}'")


def depth_diagnostics(res: Any) -> Iterable[Diagnostic]:
    """RD108: a depth below 0 or above 2**63 - 1; RD206: a trainable parameter no depth rule reaches."""
    depths: Depths | None = getattr(res, "depths", None)
    if depths is None:
        return
    spec, entries = res.spec, res.table.entries
    outside: dict[tuple[int, bool], list[str]] = {}
    for i, d in enumerate(depths.depth):
        if d is not None and not 0 <= d <= MAX_WHOLE:
            name = quoted(entries[i].name)
            outside.setdefault((depths.setter[i], d < 0), []).append(f"'{name}'" + f" ({d})" * (d < 0))
    for (index, below), names in outside.items():
        term = depth_term(spec.statements[index])
        assert term is not None
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        yield model_diagnostic(
            spec, term.pos, "RD108",
            f"this depth is below 0 for {shown}: depths are whole numbers >= 0"
            if below
            else f"this depth is above 2**63 - 1 for {shown}: depths are whole numbers from 0 to 2**63 - 1",
        )
    for i, entry in enumerate(entries):
        if entry.trainable and depths.setter[i] is None:
            yield model_diagnostic(
                spec, spec.lr_decay.pos, "RD206",
                f"'{entry.name}' is trainable but no depth rule selects it: it counts as the deepest "
                f"({depths.deepest}), lr factor 1; give it a depth, as in 'layer {entry.name} depth last'",
            )
