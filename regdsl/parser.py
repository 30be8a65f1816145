"""Text -> lark parse tree, with every syntax error of a file collected.

Lark stops at the first error. To report all of them, the statement holding an
error is blanked out (same length, so every later position stays exact) and
the text is parsed again, until it parses.
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .errors import Diagnostic, RegSyntaxError, source_line_at

KEYWORDS_SELECTOR = ("all", "layer", "type", "bias", "norm", "embedding")
KEYWORDS_TERM = ("decay", "l1", "l2", "group_lasso", "orthogonal", "max_norm", "activity", "lr_mult", "none")
KEYWORDS_SCHEDULE = ("warmup", "from", "until", "cosine")
# Words that only continue a term: `l1 λ prox`, `l2 λ to init`, `dim=1`, `cosine to λ over N`.
KEYWORDS_OPTION = ("prox", "to", "init", "ref", "dim", "over")
KEYWORDS = KEYWORDS_SELECTOR + KEYWORDS_TERM + KEYWORDS_SCHEDULE + KEYWORDS_OPTION + ("exclude",)

# Lark's terminal names, in the words a user of the language knows.
_TERMINAL_WORDS = {
    "GLOB": "a name pattern",
    "STRING": "a name pattern",
    "NUMBER": "a number",
    "COMMA": "','",
    "EQUAL": "'='",
    "_END": "end of statement",
    "$END": "end of file",
}


def grammar_text() -> str:
    """The grammar, from the installed wheel or, in a source checkout, from grammar/."""
    packaged = resources.files("regdsl").joinpath("_grammar", "regdsl.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "grammar" / "regdsl.lark").read_text(encoding="utf-8")


@functools.cache
def _lark() -> Lark:
    return Lark(grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


@functools.cache
def keyword_terminals() -> dict[str, str]:
    """Lark terminal name -> keyword text, e.g. ``"_L2" -> "l2"``."""
    return {t.name: t.name.lstrip("_").lower() for t in _lark().terminals if t.name.lstrip("_").lower() in KEYWORDS}


def decode_source(data: bytes, filename: str) -> str:
    """UTF-8 (a BOM is accepted); anything else is a positioned syntax error."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        shown = data.split(b"\n")[line - 1].removesuffix(b"\r").decode("utf-8", errors="replace")
        raise RegSyntaxError(
            Diagnostic(
                line=line,
                column=column,
                message=f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x})",
                file=filename,
                kind="syntax",
                code="RD002",
                source_line=shown,
            )
        ) from None


def parse_tree(text: str, filename: str = "<string>") -> tuple[Tree, list[Diagnostic]]:
    """Parse ``text`` (BOM already removed); return the tree of what parsed and one diagnostic per bad statement."""
    diagnostics: list[Diagnostic] = []
    work = text
    # Each round blanks one statement, so the number of statements bounds the loop.
    for _ in range(work.count("\n") + work.count(";") + 2):
        try:
            return _lark().parse(work), diagnostics
        except UnexpectedInput as exc:
            diag, offset = _diagnose(exc, work, text, filename)
            diagnostics.append(diag)
            blanked = _blank_statement(work, offset)
            if blanked == work:
                break
            work = blanked
    return Tree("start", []), diagnostics


def _diagnose(exc: UnexpectedInput, work: str, text: str, filename: str) -> tuple[Diagnostic, int]:
    """A user-worded diagnostic for a lark error, and the text offset it points at."""
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            # Lark puts EOF at the last token; the user needs the point just after it.
            offset = len(work.rstrip())
            line, column = _line_col(work, offset)
            end = (line, column + 1)
        else:
            offset = token.start_pos
            line, column = token.line, token.column
            end = (token.end_line, token.end_column)
        accepted = _accepted(exc, exc.expected)
        expected = _expected_words(accepted)
        message = _token_message(token, expected, _keywords_in(accepted))
    elif isinstance(exc, UnexpectedCharacters):
        offset = exc.pos_in_stream
        line, column = exc.line, exc.column
        end = (line, column + 1)
        expected = _expected_words(_accepted(exc, exc.allowed or ()))
        char = work[offset]
        if char == '"':
            message = "unterminated quoted pattern: a closing '\"' is missing on this line"
        else:
            message = f"unexpected character {char!r}"
            if expected:
                message += f"; expected {_join(expected)}"
            previous = exc.token_history[-1] if exc.token_history else None
            if previous is not None and previous.type == "GLOB" and previous.end_pos == offset:
                message += "; a name pattern with such characters must be quoted, as in \"blocks@0.*\""
    else:  # pragma: no cover - lark raises only the two above from an LALR parse
        raise exc
    diag = Diagnostic(
        line=line,
        column=column,
        end_line=end[0],
        end_column=end[1],
        message=message,
        file=filename,
        kind="syntax",
        code="RD001",
        source_line=source_line_at(text, line),
        expected=tuple(expected),
    )
    return diag, offset


def _accepted(exc: UnexpectedInput, fallback) -> set[str]:
    # LALR merges states, so the parser's own "expected" set can name terminals that
    # would fail one step later; accepts() tries each one and keeps only the real ones.
    interactive = getattr(exc, "interactive_parser", None)
    return interactive.accepts() if interactive is not None else set(fallback)


def _token_message(token: lark.Token, expected: list[str], keywords: list[str]) -> str:
    if token.type == "_END":
        shown = "';'" if token == ";" else "end of line"
    else:
        shown = "end of file" if token.type == "$END" else repr(str(token))
    message = f"unexpected {shown}"
    if expected:
        message += f"; expected {_join(expected)}"
    word = str(token)
    at_statement_start = any(w.startswith("a selector") for w in expected) and not any(
        w.startswith("a term") for w in expected
    )
    if token.type in keyword_terminals() and word in KEYWORDS_TERM and at_statement_start:
        return message + "; a rule starts with a selector, e.g. 'all l2 0.01'"
    if word in KEYWORDS_SCHEDULE and any(w.startswith("a term") for w in expected) and not any(
        w.startswith("a schedule") for w in expected
    ):
        return message + "; max_norm, lr_mult and none take no schedule"
    if token.type not in ("GLOB", "NUMBER"):
        return message
    # A misspelt keyword lexes as a pattern or number; offer the nearest allowed keyword
    # (a keyword out of place is not a misspelling of another one).
    # A bare number is never a misspelt keyword, though '1' looks like 'l1' to difflib.
    misspelt = word not in KEYWORDS and token.type != "NUMBER"
    hint = difflib.get_close_matches(word.lower(), keywords, n=1, cutoff=0.5) if misspelt else []
    if hint:
        message += f"; did you mean '{hint[0]}'?"
    elif at_statement_start and difflib.get_close_matches(word.lower(), KEYWORDS_TERM, n=1, cutoff=0.5):
        message += "; a rule starts with a selector, e.g. 'all l2 0.01'"
    return message


def _keywords_in(terminals) -> list[str]:
    kw = keyword_terminals()
    return [kw[name] for name in terminals if name in kw]


def _expected_words(terminals) -> list[str]:
    names = set(terminals)
    kw = keyword_terminals()
    words: list[str] = []
    terms = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_TERM]
    atoms = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_SELECTOR]
    if terms and set(terms) <= {"l1", "l2"} and len(names) == len(terms):
        # Only after 'activity': l1 and l2 name its norm here, not terms of their own.
        words += [f"'{t}'" for t in sorted(terms)]
    elif terms:
        words.append(f"a term ({', '.join(sorted(terms, key=KEYWORDS_TERM.index))})")
    if atoms:
        words.append(f"a selector ({', '.join(sorted(atoms, key=KEYWORDS_SELECTOR.index))})")
    if any(kw.get(n) == "exclude" for n in names):
        words.append("'exclude'")
    options = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_OPTION]
    words += [f"'{o}'" for o in sorted(options, key=KEYWORDS_OPTION.index)]
    steps = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_SCHEDULE]
    if steps:
        words.append(f"a schedule ({', '.join(sorted(steps, key=KEYWORDS_SCHEDULE.index))})")
    for name in ("GLOB", "STRING", "NUMBER", "COMMA", "EQUAL", "_END", "$END"):
        word = _TERMINAL_WORDS[name]
        if name in names and word not in words:
            words.append(word)
    return words


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def split_line(line: str) -> tuple[list[tuple[int, int]], int | None]:
    """The statement spans of one source line and where its comment starts.

    Statements are split by ';' outside double quotes; '#' outside quotes starts
    a comment. Quotes never span lines and have no escapes, so this is exact.
    """
    segments, start, in_quote = [], 0, False
    for i, c in enumerate(line):
        if c == '"':
            in_quote = not in_quote
        elif c == "#" and not in_quote:
            segments.append((start, i))
            return segments, i
        elif c == ";" and not in_quote:
            segments.append((start, i))
            start = i + 1
    segments.append((start, len(line)))
    return segments, None


def _blank_statement(text: str, offset: int) -> str:
    """Replace the statement around ``offset`` with spaces, keeping separators and comments."""
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", line_start)
    line_end = len(text) if line_end == -1 else line_end
    segments, _ = split_line(text[line_start:line_end])
    # An error on a separator or past the end belongs to the statement before it.
    for start, end in segments:
        if start <= offset - line_start <= end or (start, end) == segments[-1]:
            start, end = start + line_start, end + line_start
            return text[:start] + _spaces(text[start:end]) + text[end:]
    return text  # pragma: no cover - the last segment always matches


def _spaces(s: str) -> str:
    # Only '\n' ends a line; a lone '\r' must go too, or it fails again on the next round.
    return "".join(c if c == "\n" else " " for c in s)


def bare_pattern_ok(text: str) -> bool:
    """Whether ``text`` lexes as one unquoted pattern (else it must be quoted)."""
    return _glob_regex().fullmatch(text) is not None


@functools.cache
def _glob_regex():
    import re

    (glob,) = [t for t in _lark().terminals if t.name == "GLOB"]
    return re.compile(glob.pattern.to_regexp())
