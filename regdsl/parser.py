"""Text -> lark parse tree, with every syntax error of a file collected.

Lark stops at the first error. To report all of them, parsing resumes after
the statement holding an error (statements never span lines, so each parses on
its own), and the positions of what parses later are shifted back to the file's.
Each part of the file is parsed at most a few times, however many errors it has.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import re
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .errors import Diagnostic, RegSyntaxError

KEYWORDS_SELECTOR = ("all", "layer", "type", "bias", "norm", "embedding")
KEYWORDS_TERM = ("decay", "l1", "l2", "group_lasso", "orthogonal", "max_norm", "activity", "lr_mult", "depth", "none")
KEYWORDS_SCHEDULE = ("warmup", "from", "until", "cosine")
# Words that only continue a term: `l1 λ prox`, `l2 λ to init`, `dim=1`, `cosine to λ over N`, `depth last`.
KEYWORDS_OPTION = ("prox", "to", "init", "ref", "dim", "over", "last")
# Words of a search space: `loguniform(a, b) as name`, `uniform(a, b)`, `choice(v, ...)`.
KEYWORDS_SPACE = ("loguniform", "uniform", "choice", "as")
# Statements that are no rule: `exclude SELECTOR`, `lr_decay D`.
KEYWORDS_STATEMENT = ("exclude", "lr_decay")
KEYWORDS = KEYWORDS_SELECTOR + KEYWORDS_TERM + KEYWORDS_SCHEDULE + KEYWORDS_OPTION + KEYWORDS_SPACE + KEYWORDS_STATEMENT

# Lark's terminal names, in the words a user of the language knows.
_TERMINAL_WORDS = {
    "GLOB": "a name pattern",
    "STRING": "a name pattern",
    "NUMBER": "a number",
    "NAME": "a search space's name",
    "LPAR": "'('",
    "RPAR": "')'",
    "CAPTURE_NAME": "a capture name",
    "PLUS": "'+'",
    "MINUS": "'-'",
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


BOM = "\ufeff"


def strip_bom(text: str) -> str:
    """One leading BOM goes (a second is a character like any other): the rule of every entry point."""
    return text.removeprefix(BOM)


def decode_source(data: bytes, filename: str) -> str:
    """UTF-8, BOM kept (``parse`` removes it); anything else is a positioned syntax error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Positions count from after the BOM, as they do for everything parse() reports.
        before = strip_bom(data[: exc.start].decode("utf-8"))
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
                source_line=strip_bom(shown) if line == 1 else shown,
            )
        ) from None


def parse_tree(text: str, filename: str = "<string>") -> tuple[Tree, list[Diagnostic]]:
    """Parse ``text`` (BOM already removed); return the tree of what parsed and one diagnostic per bad statement."""
    try:
        return _lark().parse(text), []  # a valid file: one pass
    except UnexpectedInput:
        return _recover(text, filename)


def _recover(text: str, filename: str) -> tuple[Tree, list[Diagnostic]]:
    """Parse in windows of statements that start at one and double while they parse.

    On an error, the statements before the bad one are parsed again (the failed
    pass lost them) and parsing resumes after it, so a window that fails early
    never costs the rest of the file: every statement is parsed a few times at most.
    """
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    starts = [0] + [m.end() for m in _SEPARATOR.finditer(text) if m.group() in (";", "\n")]
    statements: list[Tree] = []
    diagnostics: list[Diagnostic] = []
    # Statements already reported, innermost last: parse up to the start of one, then go on after it.
    skips: list[tuple[int, int]] = []
    pos, window = 0, 1
    while pos < len(text) or skips:
        if skips:
            end = skips[-1][0]
        else:
            first = bisect.bisect_right(starts, pos) - 1
            end = starts[first + window] if first + window < len(starts) else len(text)
        fragment = text[pos:end]
        origin = _origin(line_starts, pos)
        try:
            tree = _lark().parse(fragment) if fragment else Tree("start", [])
        except UnexpectedInput as exc:
            diag, offset = _diagnose(exc, fragment, origin, text, line_starts, filename)
            diagnostics.append(diag)
            skips.append(_statement_span(text, starts, offset))
            window = 1
            continue
        _shift_tree(tree, origin)
        statements += tree.children
        pos = skips.pop()[1] if skips else end
        window *= 2
    return Tree("start", statements), diagnostics


# What ends a statement (';' or a line end) and what hides a ';' (a quoted pattern, to its
# closing quote or the end of its line, and a comment). The one statement-splitting rule:
# recovery reads the whole text with it, split_line (and so fmt) one line.
_SEPARATOR = re.compile(r'"[^"\n]*"?|#[^\n]*|[;\n]')


# Where a fragment starts in the file: (offset, line, column).
Origin = tuple[int, int, int]


def _origin(line_starts: list[int], offset: int) -> Origin:
    index = bisect.bisect_right(line_starts, offset) - 1
    return offset, index + 1, offset - line_starts[index] + 1


def _moved(line: int, column: int, origin: Origin) -> tuple[int, int]:
    """A fragment's (line, column) in the file: only the fragment's first line is indented."""
    return line + origin[1] - 1, column + (origin[2] - 1 if line == 1 else 0)


# Every position lark records on a token or a tree's meta: (line, column, offset).
_POSITION_FIELDS = (
    ("line", "column", "start_pos"),
    ("end_line", "end_column", "end_pos"),
    ("container_line", "container_column", "container_start_pos"),
    ("container_end_line", "container_end_column", "container_end_pos"),
)


def _shift_tree(tree: Tree, origin: Origin) -> None:
    """Positions of a fragment's tree -> positions in the file."""
    for node in tree.iter_subtrees():
        if not node.meta.empty:
            _shift(node.meta, origin)
        for child in node.children:
            if isinstance(child, lark.Token):
                _shift(child, origin)


def _shift(item: object, origin: Origin) -> None:
    for line_field, column_field, offset_field in _POSITION_FIELDS:
        line = getattr(item, line_field, None)
        if line is not None:
            line, column = _moved(line, getattr(item, column_field), origin)
            setattr(item, line_field, line)
            setattr(item, column_field, column)
        offset = getattr(item, offset_field, None)
        if offset is not None:
            setattr(item, offset_field, offset + origin[0])


def _source_line(text: str, line_starts: list[int], line: int) -> str:
    """As errors.source_line_at, without splitting the whole file for each diagnostic."""
    if not 0 < line <= len(line_starts):
        return ""
    start = line_starts[line - 1]
    end = line_starts[line] - 1 if line < len(line_starts) else len(text)
    return text[start:end].removesuffix("\r")


def _diagnose(
    exc: UnexpectedInput, work: str, origin: Origin, text: str, line_starts: list[int], filename: str
) -> tuple[Diagnostic, int]:
    """A user-worded diagnostic for a lark error in the fragment ``work``, and the file offset it points at."""
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
            rest = work[offset + 1 :].split("\n", 1)[0].removesuffix("\r")
            if "\r" in rest.split('"', 1)[0]:
                message = "a quoted pattern holds a carriage return ('\\r'); no name has one"
            else:
                message = "unterminated quoted pattern: a closing '\"' is missing on this line"
        else:
            message = f"unexpected character {char!r}"
            if expected:
                message += f"; expected {_join(expected)}"
            previous = exc.token_history[-1] if exc.token_history else None
            if previous is not None and previous.type in ("GLOB", "CAPTURE_NAME") and previous.end_pos == offset:
                message += "; a name pattern with such characters must be quoted, as in \"blocks@0.*\""
    else:  # pragma: no cover - lark raises only the two above from an LALR parse
        raise exc
    line, column = _moved(line, column, origin)
    end = _moved(*end, origin)
    diag = Diagnostic(
        line=line,
        column=column,
        end_line=end[0],
        end_column=end[1],
        message=message,
        file=filename,
        kind="syntax",
        code="RD001",
        source_line=_source_line(text, line_starts, line),
        expected=tuple(expected),
    )
    return diag, offset + origin[0]


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
        return message + "; max_norm, lr_mult, depth and none take no schedule"
    if token.type not in ("GLOB", "CAPTURE_NAME", "NUMBER", "NAME"):
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
    words += [f"'{w}'" for w in KEYWORDS_STATEMENT if any(kw.get(n) == w for n in names)]
    options = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_OPTION]
    words += [f"'{o}'" for o in sorted(options, key=KEYWORDS_OPTION.index)]
    steps = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_SCHEDULE]
    if steps:
        words.append(f"a schedule ({', '.join(sorted(steps, key=KEYWORDS_SCHEDULE.index))})")
    spaces = [kw_text for name, kw_text in kw.items() if name in names and kw_text in KEYWORDS_SPACE[:3]]
    if spaces:
        words.append(f"a search space ({', '.join(sorted(spaces, key=KEYWORDS_SPACE.index))})")
    if any(kw.get(n) == "as" for n in names):
        words.append("'as'")
    for name in ("GLOB", "STRING", "NUMBER", "NAME", "CAPTURE_NAME", "PLUS", "MINUS", "LPAR", "COMMA", "RPAR", "EQUAL", "_END", "$END"):
        word = _TERMINAL_WORDS[name]
        if name in names and word not in words:
            words.append(word)
    if spaces and "a number" in words:  # where a strength stands: the number first, then the spaces
        words.remove("a number")
        words.insert(words.index(next(w for w in words if w.startswith("a search space ("))), "a number")
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
    segments, start = [], 0
    for match in _SEPARATOR.finditer(line):
        if match.group() == ";":
            segments.append((start, match.start()))
            start = match.end()
        elif match.group().startswith("#"):
            segments.append((start, match.start()))
            return segments, match.start()
    segments.append((start, len(line)))
    return segments, None


def _statement_span(text: str, starts: list[int], offset: int) -> tuple[int, int]:
    """Where the statement around ``offset`` starts, and where the next one does.

    An error on a separator, or in the comment after the last statement, belongs
    to the statement before it.
    """
    index = bisect.bisect_right(starts, offset) - 1
    return starts[index], starts[index + 1] if index + 1 < len(starts) else len(text)


def bare_pattern_ok(text: str) -> bool:
    """Whether ``text`` lexes as one unquoted pattern (else it must be quoted)."""
    return _glob_regex().fullmatch(text) is not None


@functools.cache
def _glob_regex():
    (glob,) = [t for t in _lark().terminals if t.name == "GLOB"]
    return re.compile(glob.pattern.to_regexp())
