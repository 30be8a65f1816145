"""Spec -> canonical ``.reg`` text."""

from __future__ import annotations

from .parser import bare_pattern_ok
from .spec import Exclude, LayerAtom, NoneTerm, Pattern, Rule, Selector, TypeAtom


def format_number(value: float) -> str:
    # repr() is the shortest text that reads back as the same float.
    return repr(float(value))


def format_pattern(pattern: Pattern) -> str:
    return pattern.text if bare_pattern_ok(pattern.text) else f'"{pattern.text}"'


def format_selector(selector: Selector) -> str:
    parts = []
    for atom in selector.atoms:
        if isinstance(atom, (LayerAtom, TypeAtom)):
            parts.append(f"{atom.kind} " + ", ".join(format_pattern(p) for p in atom.patterns))
        else:
            parts.append(atom.kind)
    return " ".join(parts)


def format_statement(statement: Rule | Exclude) -> str:
    if isinstance(statement, Exclude):
        return f"exclude {format_selector(statement.selector)}"
    terms = [t.kind if isinstance(t, NoneTerm) else f"{t.kind} {format_number(t.strength)}" for t in statement.terms]
    return f"{format_selector(statement.selector)} {' '.join(terms)}"
