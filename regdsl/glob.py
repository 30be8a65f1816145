"""Dotted-path globs -> anchored regexes: what a glob means, and which globs are valid.

Validation (:class:`regdsl.spec.Pattern`) and selection (:mod:`regdsl.select`)
both go through :func:`glob_source`, so every glob that validates compiles, and a
glob the compiler cannot read is refused at parse time with a positioned RD005.
No torch here: a spec validates without it.
"""

from __future__ import annotations

import functools
import re


class GlobError(ValueError):
    """An invalid glob; the message says why, in the words of docs/language.md."""


@functools.lru_cache(maxsize=4096)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a dotted-path glob to an anchored regex; with several ``**``, each but the last keeps
    the first place its segments match (:func:`glob_source`), so no name is split every way.

    ``*`` is ``[^.]*``, ``?`` is ``[^.]``, ``[...]`` a class that never matches
    '.', and a ``**`` segment stands for zero or more whole segments.
    Raises :class:`GlobError` for an invalid glob.
    """
    return re.compile(glob_source(pattern), re.DOTALL)


@functools.lru_cache(maxsize=65536)
def glob_source(pattern: str, named: bool = False) -> str:
    """The regex :func:`glob_regex` compiles, or :class:`GlobError`: what validation asks.

    A capture segment ``{name}`` matches one path segment of digits. With ``named``, it is a
    named group and each ``**`` takes as few segments as it can, so a capture binds the
    leftmost segment that lets the glob match (:func:`capture_regex`); the names matched are the same.

    Every character of the glob becomes an escaped literal, a class of escaped members,
    or one of the fixed pieces below, so the source always compiles; validating without
    compiling keeps a file of 50,000 distinct patterns from paying for 50,000 regex builds
    it may never need (selection compiles only patterns with wildcards, see regdsl.matching).
    """
    if not pattern:
        raise GlobError("empty name pattern")
    bad = [c for c in pattern if c in '"\r\n' or not c.isprintable()]
    if bad:
        raise GlobError(f"name pattern {pattern!r} contains {bad[0]!r}")
    segments = pattern.split(".")
    # Checked segment by segment, so the first problem from the left is the one reported.
    pieces: list[str | None] = []
    captured: set[str] = set()
    for segment in segments:
        if not segment:
            raise GlobError(f"empty path segment in {pattern!r} (a leading, trailing or doubled '.')")
        if segment == "**":
            pieces.append(None)
        elif "**" in segment:
            raise GlobError(f"'**' must be a whole path segment, as in 'a.**.b', not {segment!r}")
        elif name := _capture_name(segment):
            if name in captured:
                raise GlobError(f"capture '{{{name}}}' appears twice in {pattern!r}; give each its own name")
            captured.add(name)
            pieces.append(f"(?P<{name}>[0-9]+)" if named else "[0-9]+")
        else:
            pieces.append(_segment_regex(segment))
    # Consecutive '**' mean the same as one, and keeping them would make the regex ambiguous.
    pieces = [p for i, p in enumerate(pieces) if not (p is None and i > 0 and pieces[i - 1] is None)]
    if pieces == [None]:
        return r".*"
    out = []
    last = max(i for i, p in enumerate(pieces) if p is None) if None in pieces else -1
    atomic = False  # inside the group of a '**' that another follows
    for i, piece in enumerate(pieces):
        if piece is None:
            if atomic:
                out.append(r"(?=\.|\Z))")  # the group ends where a segment does
            # Leading: "x." repeated; elsewhere ".x" repeated, so each repetition starts at a dot.
            repeat = r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            # A '**' that another follows, with the segments up to it, is one atomic group: it takes the
            # first place where those segments match, whole, and keeps it. The leftmost place is as good
            # as any (the next '**' takes what lies between), and keeping it spares a glob of k such
            # '**' the O(n^k) ways to split an n-segment name that a regex would try before failing.
            atomic = i < last
            out.append(f"(?>{repeat}?" if atomic else repeat + ("?" if named else ""))
            continue
        if i > 0 and not (i == 1 and pieces[0] is None):  # a leading '**' ate its dot
            out.append(r"\.")
        out.append(piece)
    return "".join(out)


# A capture's name: an identifier that is no number word (``depth inf`` reads a number).
_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NOT_CAPTURE_NAMES = frozenset({"inf", "infinity", "nan", "last"})


def _capture_name(segment: str) -> str | None:
    """The name of a capture segment ``{name}``, None for any other segment (a stray brace is
    refused by :func:`_segment_regex`; inside a class, ``[{]``, it is a member)."""
    if not (segment.startswith("{") and segment.endswith("}")):
        return None
    match = _CAPTURE.fullmatch(segment)
    if match is None:
        raise GlobError(
            f"a capture is '{{name}}', name a letter or '_' then letters, digits or '_' (as in 'blocks.{{i}}.**'), "
            f"not {segment!r}"
        )
    name = match.group(1)
    if name.lower() in _NOT_CAPTURE_NAMES:
        raise GlobError(f"'{name}' cannot name a capture: 'depth {name}' would read as a number or 'last'")
    return name


def glob_captures(pattern: str) -> tuple[str, ...]:
    """The capture names of a valid glob, in order: ``blocks.{i}.**`` -> ``("i",)``."""
    return tuple(name for s in pattern.split(".") if (name := _capture_name(s)))


@functools.lru_cache(maxsize=4096)
def capture_regex(pattern: str) -> re.Pattern[str]:
    """Matches a name when the glob matches it or a dotted prefix of it (a layer's reading), with
    each capture a named group: the first binding from the left."""
    return re.compile(f"(?:{glob_source(pattern, named=True)})(?:\\..*)?", re.DOTALL)


def _unbalanced(segment: str) -> GlobError:
    return GlobError(f"unbalanced '[' or ']' in {segment!r}; a character class is '[abc]'")


def _segment_regex(segment: str) -> str:
    """One segment's regex. Between two ``*`` lies a piece of fixed length (literals, ``?``,
    classes); each such piece is an atomic group that takes its first place after the ``*`` before
    it and keeps it. The first place is as good as any, since the next ``*`` takes what lies
    between, and keeping it spares ``*a*a*a...`` the polynomial ways a regex would otherwise try
    to place each piece before failing. Only the last ``*`` of a segment backtracks."""
    pieces: list[list[str]] = [[]]  # the fixed pieces, split at each '*'
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":  # never two in a row: glob_source refuses '**' inside a segment
            pieces.append([])
        elif c == "?":
            pieces[-1].append(r"[^.]")
        elif c == "[":
            i, regex = _class_regex(segment, i)
            pieces[-1].append(regex)
        elif c == "]":
            raise _unbalanced(segment)
        elif c in "{}":
            raise GlobError(
                f"'{c}' in {segment!r}: a capture is a whole path segment, as in 'blocks.{{i}}.**'; "
                f"a literal brace is '[{c}]'"
            )
        else:
            pieces[-1].append(re.escape(c))
        i += 1
    out = ["".join(pieces[0])]
    for k, piece in enumerate(pieces[1:], start=1):
        fixed = "".join(piece)
        out.append(f"(?>[^.]*?{fixed})" if k < len(pieces) - 1 else f"[^.]*{fixed}")
    return "".join(out)


def _class_regex(segment: str, start: int) -> tuple[int, str]:
    """The class opening at ``segment[start]``: the index of its closing ']' and its regex."""
    first = start + 1
    negate = segment[first : first + 1] == "!"
    first += negate
    # A ']' first in the class (after an optional '!') is a member, not the end: '[]a]', '[!]]'.
    end = segment.find("]", first + 1 if segment[first : first + 1] == "]" else first)
    if end == -1:
        if segment[first : first + 1] == "]":
            raise GlobError(
                f"character class in {segment!r} never closes: a ']' right after '[' or '[!' is a member "
                "of the class, as in '[]a]', so a class cannot be empty"
            )
        raise _unbalanced(segment)
    body = segment[first:end]
    members, k = [], 0
    while k < len(body):
        # 'a-z' is a range; a '-' first or last in the class is itself.
        if k + 2 < len(body) and body[k + 1] == "-":
            low, high = body[k], body[k + 2]
            if low > high:
                raise GlobError(
                    f"reversed range '{low}-{high}' in character class of {segment!r}; write '{high}-{low}'"
                )
            members.append(f"{re.escape(low)}-{re.escape(high)}")
            k += 3
        else:
            # Escaped one by one, so no '-' or ']' of the glob turns into regex syntax.
            members.append(re.escape(body[k]))
            k += 1
    chars = "".join(members)
    return end, (f"[^.{chars}]" if negate else f"(?!\\.)[{chars}]")
