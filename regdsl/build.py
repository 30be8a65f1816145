"""Parse tree -> validated :class:`Spec`; the public ``parse`` and ``load``.

The tree is turned into plain data with a ``pos`` on every node, then
validated by the Pydantic models in :mod:`regdsl.spec`, so the rules about
valid values live in one place. Each Pydantic error is mapped back, through
its location path, to the span of the node that caused it.
"""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal
from typing import Any

from lark import Token, Tree
from pydantic import ValidationError

from .errors import Diagnostic, RegSyntaxError, RegValidationError
from .gcpause import paused_gc
from .parser import decode_source, parse_tree, strip_bom
from .spec import MAX_WHOLE, Spec, error_code, relevant_errors


def parse(text: str, filename: str = "<string>") -> Spec:
    """Parse and validate rule text. Raises :class:`RegSyntaxError` or :class:`RegValidationError`."""
    if not isinstance(text, str):
        hint = ": decode them first, or regdsl.load(path) reads a file" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"parse() takes the rule text as a str, not {type(text).__name__}{hint}")
    if not isinstance(filename, str):
        raise TypeError(f"parse()'s filename names the text in messages: a str, not {type(filename).__name__}")
    # The only place a BOM is removed: parse(), load() and the command line all come through here.
    text = strip_bom(text)
    with paused_gc():  # a parse tree, plain data and a spec of every line, all alive at once
        return _parse(text, filename)


def _parse(text: str, filename: str) -> Spec:
    tree, diagnostics = parse_tree(text, filename)
    root, leaf_spans, literal_problems = _to_data(tree)
    lines = text.split("\n")  # once: one split per diagnostic made many errors quadratic
    diagnostics += [_diagnostic(lines, filename, span, message, code) for span, message, code in literal_problems]
    spec = None
    try:
        spec = Spec.model_validate({**root, "origin": None if filename == "<string>" else filename})
    except ValidationError as exc:
        errors = relevant_errors(exc)
        # A bad literal was replaced by 0 to keep going; what the models say about that 0 is noise.
        bad_literals = {(d.line, d.column) for d in diagnostics if d.code == "RD003"}
        if any(d.kind == "syntax" for d in diagnostics):
            # A statement lost to a syntax error may be the depth rule or lr_decay the other one needs,
            # or the definition of a search space another term names (when its line holds the name).
            lost = [lines[d.line - 1] for d in diagnostics if d.kind == "syntax" and 0 < d.line <= len(lines)]
            errors = [
                e for e in errors
                if e["type"] != "lr_decay_pairing" and not (e["type"] == "space_unbound" and _named_in(e["ctx"]["name"], lost))
            ]
        # ... and so is a choice that lists that 0 twice, when a bad literal on its line was one of them.
        bad_lines = {line for line, _ in bad_literals}
        found = [(e, _from_pydantic(e, root, leaf_spans, lines, filename)) for e in errors]
        diagnostics += [
            d
            for e, d in found
            if (d.line, d.column) not in bad_literals
            and not (e["type"] == "space_duplicate" and e["ctx"]["value"] == 0 and d.line in bad_lines)
        ]
    if diagnostics:
        error = RegSyntaxError if any(d.kind == "syntax" for d in diagnostics) else RegValidationError
        raise error(diagnostics)
    assert spec is not None
    spec._source = text
    return spec


def _named_in(name: str, lines: list[str]) -> bool:
    word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")
    return any(word.search(line) for line in lines)


def load(path: str | os.PathLike[str]) -> Spec:
    """Read and parse a ``.reg`` file (UTF-8, BOM allowed). ``OSError`` passes through."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"load() takes a .reg file's path (a str or a pathlib.Path), not {type(path).__name__}"
            + ("; pass a Spec to regdsl.compile as it is" if type(path).__name__ == "Spec" else "")
        )
    filename = os.fspath(path)
    with open(filename, "rb") as handle:
        data = handle.read()
    return parse(decode_source(data, filename), filename)


# ---------------------------------------------------------------- tree -> data

_NONZERO_MANTISSA = re.compile(r"[1-9]")
_INTEGER = re.compile(r"[+-]?[0-9]+").fullmatch
# Digits of the largest step count or dim (2**63 - 1): a longer literal is out of range.
_MAX_WHOLE_DIGITS = len(str(MAX_WHOLE))


def _shown(token: str) -> str:
    """A literal as a message quotes it: a 5,000-digit number is shortened, the caret shows it whole."""
    return token if len(token) <= 32 else f"{token[:16]}...{token[-8:]}"


def _span(meta_or_token: Any) -> dict[str, int]:
    return {
        "line": meta_or_token.line,
        "column": meta_or_token.column,
        "end_line": meta_or_token.end_line,
        "end_column": meta_or_token.end_column,
    }


class LeafSpans(dict[tuple[int, str | int], dict[str, int]]):
    """The spans of plain values (a strength's number), keyed by ``(id(owner), field)``. Each owner is
    held: validation replaces some dicts in the data (a space defined twice), and a freed one's id,
    reused by a new dict, pointed an error at another line."""

    def __init__(self) -> None:
        super().__init__()
        self._owners: list[Any] = []

    def at(self, owner: Any, field: str | int, span: dict[str, int]) -> None:
        self._owners.append(owner)
        self[id(owner), field] = span


_SPACE_NODES = ("loguniform", "uniform", "choice", "space_ref")


def _to_data(tree: Tree) -> tuple[dict[str, Any], LeafSpans, list[tuple[dict[str, int], str, str]]]:
    """Plain dicts for Pydantic (``statements`` and ``lr_decay``), the spans of plain values in
    them (a strength's number), and problems Pydantic never sees (number literals, a second lr_decay)."""
    leaf_spans = LeafSpans()
    problems: list[tuple[dict[str, int], str, str]] = []

    def whole(token: Token) -> float | int:
        # Step counts and dims read as ints when written as ints, so no count above 2**53 loses digits.
        if not _INTEGER(token):
            value = number(token)
            if value == 0 or not math.isfinite(value):  # zero, RD003 already said, or inf/nan for the spec to refuse
                return value
            # Exactly, not through the float: 1.0000000000000000001 rounds to 1.0, 9007199254740993.0 to ...992.
            exact = Decimal(str(token))
            if exact != exact.to_integral_value():
                # Not whole: the spec refuses it, quoting the literal where the float would read whole.
                return str(token) if value == int(value) else value
            if exact.adjusted() >= _MAX_WHOLE_DIGITS:
                return -(10**_MAX_WHOLE_DIGITS) if exact < 0 else 10**_MAX_WHOLE_DIGITS
            return int(exact)
        negative = token.startswith("-")
        # int() refuses 4,300+ digits, leading zeros included, and is slow long before.
        digits = token.lstrip("+-").lstrip("0") or "0"
        if len(digits) > _MAX_WHOLE_DIGITS:
            # Out of range whatever its digits: a stand-in just past the bound lets the spec say so.
            return -(10**_MAX_WHOLE_DIGITS) if negative else 10**_MAX_WHOLE_DIGITS
        return -int(digits) if negative else int(digits)

    def number(token: Token) -> float:
        value = float(token)
        if math.isinf(value) and "inf" not in token.lower():
            sign = "-" if value < 0 else ""
            problems.append((_span(token), f"number {_shown(token)} is too large: it overflows to {sign}infinity", "RD003"))
            return 0.0
        if value == 0 and _NONZERO_MANTISSA.search(re.split("[eE]", str(token))[0]):
            problems.append((_span(token), f"number {_shown(token)} is too small: it underflows to 0", "RD003"))
            return 0.0
        return value

    def pattern(node: Tree) -> dict[str, Any]:
        (token,) = node.children
        text = token[1:-1] if token.type == "STRING" else str(token)
        return {"text": text, "pos": _span(token)}

    def atom(node: Tree) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": str(node.data), "pos": _span(node.meta)}
        if node.data in ("layer", "type"):
            out["patterns"] = [pattern(child) for child in node.children]
        return out

    def selector(node: Tree) -> dict[str, Any]:
        return {"atoms": [atom(child) for child in node.children], "pos": _span(node.meta)}

    def schedule(node: Tree) -> dict[str, Any]:
        steps = []
        for child in node.children:
            step: dict[str, Any] = {"kind": str(child.data), "pos": _span(child.meta)}
            if child.data == "cosine":
                step["end"] = number(child.children[0])
                step["steps"] = whole(child.children[1])
                leaf_spans.at(step, "end", _span(child.children[0]))
                leaf_spans.at(step, "steps", _span(child.children[1]))
            else:
                field = "steps" if child.data == "warmup" else "step"
                step[field] = whole(child.children[0])
                leaf_spans.at(step, field, _span(child.children[0]))
            steps.append(step)
        out: dict[str, Any] = {"steps": steps}
        if not node.meta.empty:
            out["pos"] = _span(node.meta)
        return out

    # The field each term's number fills.
    value_field = {"max_norm": "norm", "lr_mult": "factor"}

    def space(node: Tree) -> dict[str, Any]:
        kind = str(node.data)
        if kind == "space_ref":
            return {"kind": "name", "name": str(node.children[0]), "pos": _span(node.meta)}
        out: dict[str, Any] = {"kind": kind, "pos": _span(node.meta)}
        numbers = [c for c in node.children if isinstance(c, Token)]
        named = [c for c in node.children if isinstance(c, Tree)]
        if named:
            out["name"] = str(named[0].children[0])
            leaf_spans.at(out, "name", _span(named[0].children[0]))
        if kind == "choice":
            out["choices"] = [number(t) for t in numbers]
            for i, token in enumerate(numbers):
                leaf_spans.at(out["choices"], i, _span(token))
        else:
            out["low"], out["high"] = number(numbers[0]), number(numbers[1])
            leaf_spans.at(out, "low", _span(numbers[0]))
            leaf_spans.at(out, "high", _span(numbers[1]))
        return out

    def term(node: Tree) -> dict[str, Any]:
        kind = str(node.data)
        out: dict[str, Any] = {"kind": kind, "pos": _span(node.meta)}
        field = value_field.get(kind, "strength")
        for child in node.children:
            if isinstance(child, Token):
                out[field] = number(child)
                leaf_spans.at(out, field, _span(child))
            elif child.data in _SPACE_NODES:
                out[field] = space(child)
            elif child.data == "prox":
                out["prox"] = True
            elif child.data in ("to_init", "to_ref"):
                out["to"] = str(child.data)[3:]
            elif child.data == "dim":
                out["dim"] = whole(child.children[0])
                leaf_spans.at(out, "dim", _span(child.children[0]))
            elif child.data == "schedule":
                out["schedule"] = schedule(child)
            elif str(child.data).startswith("depth_"):
                out["expr"] = depth_expr(child)
        return out

    def depth_expr(node: Tree) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": str(node.data)[len("depth_"):], "pos": _span(node.meta)}
        for child in node.children:
            if isinstance(child, Token) and child.type == "NUMBER":
                out["value"] = whole(child)
                leaf_spans.at(out, "value", _span(child))
            elif isinstance(child, Token):
                out["name"] = str(child)
            else:  # depth_offset: '+' or '-', then the number
                sign, amount = child.children
                out["op"] = str(sign)
                out["amount"] = whole(amount)
                leaf_spans.at(out, "amount", _span(amount))
        return out

    statements: list[dict[str, Any]] = []
    lr_decay: dict[str, Any] | None = None
    for node in tree.children:
        if node.data == "lr_decay":
            (token,) = node.children
            if lr_decay is not None:
                problems.append((_span(node.meta), f"a second lr_decay: the first is on line {lr_decay['pos']['line']}", "RD013"))
                continue
            lr_decay = {"kind": "lr_decay", "pos": _span(node.meta)}
            if isinstance(token, Token):
                lr_decay["factor"] = number(token)
                leaf_spans.at(lr_decay, "factor", _span(token))
            else:  # a search space: lr_decay is tuned like any strength
                lr_decay["factor"] = space(token)
            continue
        entry: dict[str, Any] = {"kind": str(node.data), "pos": _span(node.meta), "selector": selector(node.children[0])}
        if node.data == "rule":
            entry["terms"] = [term(child) for child in node.children[1:]]
        statements.append(entry)
    root: dict[str, Any] = {"statements": statements}
    if lr_decay is not None:
        root["lr_decay"] = lr_decay
    return root, leaf_spans, problems


# ---------------------------------------------------------------- errors


def _from_pydantic(error: Any, data: dict[str, Any], leaf_spans: LeafSpans, lines: list[str], filename: str) -> Diagnostic:
    """Point a Pydantic error at the innermost node on its location path that has a position."""
    loc = list(error["loc"])
    # A validator may name the offending element itself ("at"), finer than its field.
    ctx = error.get("ctx") or {}
    if "at" in ctx:
        at = ctx["at"]
        loc += [int(k) if k.isdigit() else k for k in at.split(".")] if isinstance(at, str) else [at]
    node: Any = data
    span = None
    for key in loc:
        # Discriminated unions add the tag ("rule", "l2") to the path; it names no child.
        # A callable discriminator's tag ("space", "number") names no child either.
        if isinstance(node, dict) and isinstance(key, str) and key not in node:
            continue
        parent = node
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "pos" in node:
            span = node["pos"]
        elif (id(parent), key) in leaf_spans:
            span = leaf_spans[id(parent), key]
    return _diagnostic(lines, filename, span, error["msg"], error_code(error))


def _diagnostic(lines: list[str], filename: str, span: dict[str, int] | None, message: str, code: str) -> Diagnostic:
    span = span or {"line": 1, "column": 1, "end_line": 1, "end_column": 1}
    line = span["line"]
    return Diagnostic(
        line=span["line"],
        column=span["column"],
        end_line=span["end_line"],
        end_column=span["end_column"],
        message=message,
        file=filename,
        kind="validation",
        code=code,
        # As errors.source_line_at, from lines split once.
        source_line=lines[line - 1].removesuffix("\r") if 0 < line <= len(lines) else "",
    )
