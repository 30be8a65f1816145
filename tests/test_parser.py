"""Targeted parser tests: the promises of the error contract and of the Spec models.

The golden files (test_parser_golden.py) pin exact messages; these tests pin the
properties that must hold whatever the wording: user words only, real positions,
the exception classes, and what ``==``, freezing and JSON do with a spec.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pydantic
import pytest
from lark.exceptions import LarkError

import regdsl
from regdsl import RegDslError, RegSyntaxError, RegValidationError
from regdsl.spec import (
    ActivityL1Term,
    ActivityL2Term,
    AllAtom,
    CosineStep,
    DecayTerm,
    FromStep,
    GroupLassoTerm,
    L1Term,
    L2Term,
    LayerAtom,
    LrMultTerm,
    MaxNormTerm,
    OrthogonalTerm,
    Pattern,
    Rule,
    Schedule,
    Selector,
    Spec,
    TypeAtom,
    UntilStep,
    WarmupStep,
)

INVALID = sorted((Path(__file__).parent / "data" / "parse" / "invalid").glob("*.reg"))

# Lark's names for terminals; a user never wrote any of these and cannot act on them.
LARK_NAMES = ("__ANON", "GLOB", "NUMBER", "_END", "$END", "STRING", "COMMA")


def errors_of(text: str) -> RegDslError:
    with pytest.raises(RegDslError) as info:
        regdsl.parse(text)
    return info.value


def positions(err: RegDslError) -> list[tuple[int, int]]:
    return [(d.line, d.column) for d in err.diagnostics]


def assert_user_words(err: RegDslError) -> None:
    for d in err.diagnostics:
        for name in LARK_NAMES:
            assert name not in d.message, d.message
            assert all(name not in word for word in d.expected), d.expected


# ---------------------------------------------------------------- user words


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_golden_errors_use_user_words(path: Path):
    with pytest.raises(RegDslError) as info:
        regdsl.load(path)
    assert_user_words(info.value)


def _fuzzed_texts(count: int) -> list[str]:
    # Lower-case only: then any upper-case lark name in a message came from regdsl,
    # not from an echo of the user's own text.
    # fmt: off
    vocab = [
        "all", "layer", "type", "bias", "norm", "embedding", "exclude", "decay", "l1", "l2", "none",
        "l3", "fc2.*", "**", "a..b", "[x", '"q"', '"', '""', ",", ";", "\n", "\r\n", " ", "\t", "#c",
        "0.01", "-1", "nan", "inf", "1e400", "1e-400", ".5", "@", "$", "é", "\x00", "\r",
    ]
    # fmt: on
    rng = random.Random(20240611)
    return ["".join(rng.choice(vocab) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def test_fuzzed_errors_use_user_words():
    failures = 0
    for text in _fuzzed_texts(600):
        try:
            regdsl.parse(text)
        except RegDslError as err:
            failures += 1
            assert_user_words(err)
    # Most random token soups are wrong; if none were, this test checked nothing.
    assert failures > 300


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all l2", ("a number", "a search space (loguniform, uniform, choice)", "a search space's name")),
        ("layer\n", ("a name pattern",)),
        ("exclude", ("a selector (all, layer, type, bias, norm, embedding)",)),
        (
            "layer fc2.* l3 1",
            ("a term (decay, l1, l2, group_lasso, orthogonal, max_norm, activity, lr_mult, depth, none)", "a selector (all, layer, type, bias, norm, embedding)", "','"),
        ),
    ],
)
def test_expected_is_in_user_words(text: str, expected: tuple[str, ...]):
    err = errors_of(text)
    assert err.expected == expected


# ---------------------------------------------------------------- positions


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("all l2", 1, 7),
        ("exclude", 1, 8),
        ("layer a,", 1, 9),
        ("all l2 1\nlayer fc2.*", 2, 12),
        ("\n\n  all decay", 3, 12),
        # Trailing blanks are not where anything is missing: point just after the last word.
        ("all l2   ", 1, 7),
    ],
)
def test_eof_error_points_at_the_end(text: str, line: int, column: int):
    err = errors_of(text)
    (d,) = err.diagnostics
    assert "end of file" in d.message
    assert (d.line, d.column) == (line, column)
    # The caret goes just past the last character of the line, not onto it.
    assert err.caret == " " * (column - 1) + "^"


def test_eof_error_after_other_errors_keeps_its_position():
    # Earlier statements are blanked to find later errors; the EOF position must not move.
    err = errors_of("all l3 1\nall l2")
    assert positions(err) == [(1, 5), (2, 7)]


def test_first_diagnostic_fields_on_the_exception(tmp_path: Path):
    path = tmp_path / "rules.reg"
    path.write_text("all l2 1\nlayer a..b l2 1\nall l2 1\nexclude\n", encoding="utf-8")
    with pytest.raises(RegSyntaxError) as info:
        regdsl.load(path)
    err = info.value
    # Sorted by position: the validation error on line 2 comes before the syntax error on line 4.
    assert positions(err) == [(2, 7), (4, 8)]
    assert [d.kind for d in err.diagnostics] == ["validation", "syntax"]
    assert (err.file, err.line, err.column) == (str(path), 2, 7)
    assert err.source_line == "layer a..b l2 1"
    assert err.caret == " " * 6 + "^^^^"


def test_caret_follows_tabs():
    err = errors_of("\tall l3 1")
    assert err.column == 6
    # A tab is one column for the parser but many on screen; the caret line copies it.
    assert err.caret == "\t    ^^"


@pytest.mark.parametrize(
    "text",
    [
        "all\fl2 1\nexclude\n",  # a form feed is whitespace in the language
        "# a line\u2028separator in a comment\nexclude\n",
        "# a next-line\x85char in a comment\nexclude\n",
    ],
    ids=["form-feed", "u2028", "nel"],
)
def test_source_line_is_the_line_of_the_error(text: str):
    # Only '\n' ends a line for the lexer; the shown line must be the one the position names.
    err = errors_of(text)
    assert (err.line, err.column) == (2, 8)
    assert err.source_line == "exclude"


def test_lone_carriage_return_is_reported_once():
    # '\r' alone is no line end in this language. It is one error, not one per reparse.
    err = errors_of("all l2 1\rall l2 2\n")
    assert positions(err) == [(1, 9)]
    assert "'\\r'" in err.diagnostics[0].message


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("text", ["all l3 0.1", "layer fc2.* l3 0.01", "all decay 1 l3 1"])
def test_l3_suggests_l2(text: str):
    err = errors_of(text)
    assert err.diagnostics[0].message.endswith("did you mean 'l2'?")


@pytest.mark.parametrize(
    ("text", "word", "keyword"),
    [("all dacay 1", "dacay", "decay"), ("lyaer a l2 1", "lyaer", "layer"), ("exlcude bias", "exlcude", "exclude")],
)
def test_misspelt_keyword_suggests_nearest(text: str, word: str, keyword: str):
    message = errors_of(text).diagnostics[0].message
    assert message.startswith(f"unexpected '{word}'")
    assert message.endswith(f"did you mean '{keyword}'?")


def test_no_suggestion_for_a_word_unlike_any_keyword():
    # A far-fetched "did you mean" misleads more than it helps.
    assert "did you mean" not in errors_of("all frobnicate 1").diagnostics[0].message


def test_term_without_selector_says_a_rule_starts_with_a_selector():
    message = errors_of("decay 0.1").diagnostics[0].message
    assert message.startswith("unexpected 'decay'")
    assert "a rule starts with a selector" in message


@pytest.mark.parametrize(
    ("text", "word"),
    [("all l21", "l21"), ("alldecay 1", "alldecay"), ("exclude biased", "biased"), ("exclude normal", "normal")],
)
def test_keyword_is_a_whole_word(text: str, word: str):
    # Otherwise `all l21` silently means `all l2 1`, and `exclude biased` complains about 'ed'.
    err = errors_of(text)
    assert isinstance(err, RegSyntaxError)
    assert f"unexpected '{word}'" in err.diagnostics[0].message


# ---------------------------------------------------------------- encodings


def test_bom_is_accepted_by_load(tmp_path: Path):
    path = tmp_path / "bom.reg"
    path.write_bytes(b"\xef\xbb\xbflayer fc2.* l2 0.01; exclude bias\n")
    assert regdsl.load(path) == regdsl.parse("layer fc2.* l2 0.01; exclude bias\n")


def test_bom_takes_no_column(tmp_path: Path):
    path = tmp_path / "bom.reg"
    path.write_bytes(b"\xef\xbb\xbfall l3 1\n")
    with pytest.raises(RegSyntaxError) as info:
        regdsl.load(path)
    assert (info.value.line, info.value.column) == (1, 5)
    assert info.value.source_line == "all l3 1"


@pytest.mark.parametrize(
    ("data", "line", "column", "byte", "shown"),
    [
        # The column counts characters, as the parser does: 'é' is two bytes but one column.
        (b'all l2 1\nlayer "\xc3\xa9\xff" l2 1\n', 2, 9, "0xff", 'layer "\xe9\ufffd" l2 1'),
        (b"# caf\xe9 in Latin-1\nall l2 1\n", 1, 6, "0xe9", "# caf\ufffd in Latin-1"),
        (b"\xef\xbb\xbfall l2 \xff\n", 1, 8, "0xff", "all l2 \ufffd"),
        (b"\xef\xbb\xbfall l2 1\nlayer \xff l2 1\n", 2, 7, "0xff", "layer \ufffd l2 1"),
    ],
    ids=["after-multibyte", "latin1", "bom-line1", "bom-line2"],
)
def test_invalid_utf8_is_a_positioned_syntax_error(tmp_path: Path, data, line, column, byte, shown):
    path = tmp_path / "bad.reg"
    path.write_bytes(data)
    with pytest.raises(RegSyntaxError) as info:
        regdsl.load(path)
    err = info.value
    (d,) = err.diagnostics
    assert (d.line, d.column, d.kind, d.file) == (line, column, "syntax", str(path))
    assert "not valid UTF-8" in d.message and byte in d.message
    assert d.source_line == shown
    assert err.caret == " " * (column - 1) + "^"


def test_crlf_file_via_load(tmp_path: Path):
    path = tmp_path / "crlf.reg"
    path.write_bytes(b"all decay 0.1\r\nexclude bias\r\n")
    assert regdsl.load(path) == regdsl.parse("all decay 0.1\nexclude bias\n")


# ---------------------------------------------------------------- keywords as names


def test_keywords_after_layer_are_patterns():
    spec = regdsl.parse("layer norm, type l2 1")
    expected = Spec(
        statements=(
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="norm"), Pattern(text="type"))),)),
                terms=(L2Term(strength=1.0),),
            ),
        )
    )
    assert spec == expected


def test_keyword_pattern_is_not_the_keyword_atom():
    # `exclude layer bias` names a module called bias, not every bias parameter.
    (statement,) = regdsl.parse("exclude layer bias").statements
    (atom,) = statement.selector.atoms
    assert isinstance(atom, LayerAtom)
    assert [p.text for p in atom.patterns] == ["bias"]


# ---------------------------------------------------------------- exception types


@pytest.mark.parametrize(
    ("text", "cls"),
    [
        ("all l3 1", RegSyntaxError),
        ("all l2 -1", RegValidationError),
        ('layer "" l2 1', RegValidationError),
        # One syntax problem makes the whole report a syntax error.
        ("all l2 -1\nall l3 1", RegSyntaxError),
    ],
)
def test_exception_type(text: str, cls: type):
    err = errors_of(text)
    assert type(err) is cls
    assert not isinstance(err, (pydantic.ValidationError, LarkError))
    # No lark or pydantic traceback chained under the user's error.
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


def test_error_hierarchy():
    assert issubclass(RegSyntaxError, RegDslError)
    assert issubclass(RegValidationError, RegDslError)
    assert not issubclass(RegSyntaxError, RegValidationError)
    assert not issubclass(RegValidationError, RegSyntaxError)


# ---------------------------------------------------------------- the Spec models

TEXT = 'layer fc2.* l2 0.01; exclude bias\ntype "My Mod", *Norm decay 5E-3 l1 0 none\n'


def test_json_round_trip_keeps_meaning_and_positions():
    spec = regdsl.parse(TEXT, "rules.reg")
    back = Spec.from_json(spec.to_json())
    assert back == spec
    # == ignores positions, so compare the full dump to see they survived.
    assert back.model_dump() == spec.model_dump()
    assert back.statements[2].pos.line == 2
    assert back.statements[2].selector.atoms[0].patterns[0].pos.column == 6
    assert back.origin == "rules.reg"


_ALL = {"atoms": [{"kind": "all"}]}


@pytest.mark.parametrize(
    ("data", "mentions"),
    [
        ("not json", "Invalid JSON"),
        ("[]", "object"),
        (json.dumps({"statements": [], "bogus": 1}), "bogus"),
        (
            json.dumps({"statements": [{"kind": "rule", "selector": _ALL, "terms": [{"kind": "l2", "strength": -1}]}]}),
            "strength must be >= 0",
        ),
        (
            json.dumps(
                {
                    "statements": [
                        {"kind": "exclude", "selector": {"atoms": [{"kind": "layer", "patterns": [{"text": "a..b"}]}]}}
                    ]
                }
            ),
            "empty path segment",
        ),
        (
            json.dumps(
                {
                    "statements": [
                        {
                            "kind": "rule",
                            "selector": _ALL,
                            "terms": [{"kind": "l2", "strength": 1}, {"kind": "l2", "strength": 2}],
                        }
                    ]
                }
            ),
            "appears twice",
        ),
    ],
    ids=["not-json", "not-object", "extra-field", "negative", "bad-pattern", "duplicate-term"],
)
def test_from_json_of_bad_json_is_a_validation_error(data: str, mentions: str):
    with pytest.raises(RegValidationError) as info:
        Spec.from_json(data)
    err = info.value
    assert not isinstance(err, pydantic.ValidationError)
    assert any(mentions in d.message for d in err.diagnostics), [d.message for d in err.diagnostics]


def test_spec_is_frozen():
    spec = regdsl.parse(TEXT)
    rule = spec.statements[0]
    with pytest.raises(pydantic.ValidationError):
        spec.origin = "other.reg"
    with pytest.raises(pydantic.ValidationError):
        rule.terms[0].strength = 1.0
    with pytest.raises(pydantic.ValidationError):
        rule.selector.atoms[0].patterns[0].text = "x"
    # A refused assignment leaves nothing half-changed.
    assert spec.origin is None and rule.terms[0].strength == 0.01
    assert rule.selector.atoms[0].patterns[0].text == "fc2.*"
    # Containers are tuples, so nothing can be appended behind the validators' back.
    assert isinstance(spec.statements, tuple) and isinstance(rule.terms, tuple)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Pattern(text="a", bogus=1),
        lambda: L2Term(strength=1.0, weight=2),
        lambda: Spec.model_validate({"statements": [], "version": 1}),
        lambda: Rule.model_validate(
            {"selector": {"atoms": [{"kind": "all", "negate": True}]}, "terms": [{"kind": "none"}]}
        ),
    ],
    ids=["pattern", "term", "spec", "nested-atom"],
)
def test_unknown_fields_are_rejected(build):
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        build()


def test_equality_ignores_positions_and_origin():
    a = regdsl.parse("all l2 1\nlayer a l1 0.5", "a.reg")
    b = regdsl.parse('\n\n   all   l2 1.0   # same meaning\nlayer "a" l1 5e-1', "b.reg")
    assert a.statements[0].pos != b.statements[0].pos
    assert a == b
    assert hash(a) == hash(b)
    # A spec built by hand, with no positions at all, is the same spec.
    assert regdsl.parse("all l2 1") == Spec(
        statements=(Rule(selector=Selector(atoms=(AllAtom(),)), terms=(L2Term(strength=1.0),)),)
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("all l2 1", "all l2 2"),
        ("all l2 1", "all l1 1"),
        ("all l2 1 none", "all none l2 1"),  # `none` clears what came before it: order is meaning
        ("exclude bias", "bias none"),
        ("layer a l2 1", "type a l2 1"),
        ("layer a l2 1", "layer a, b l2 1"),
        ("all l2 1", "all l2 1\nall l2 1"),
        ("all bias l2 1", "bias all l2 1"),
    ],
)
def test_equality_sees_meaning(left: str, right: str):
    assert regdsl.parse(left) != regdsl.parse(right)


# ---------------------------------------------------------------- issue 4: terms, options, schedules

NEW_TERMS_TEXT = """\
all l1 1e-4 prox warmup 1e2 from 50 until 5000
layer fc2.* l2 0.01 to init cosine to 1e-3 over 10
layer fc3.* l2 .5 to ref
layer conv group_lasso 2 dim = 1 until 7 warmup 3
layer conv2 group_lasso 2
type Linear max_norm 3 dim=-1
all orthogonal 1e-3 from 0
type ReLU activity l1 1e-5 activity l2 2
layer head.** lr_mult 0.1 decay 0.5 cosine to 0 over 4
layer from, to, dim l1 1
"""


def test_new_terms_fill_their_fields():
    spec = regdsl.parse(NEW_TERMS_TEXT)
    expected = Spec(
        statements=(
            Rule(
                selector=Selector(atoms=(AllAtom(),)),
                terms=(
                    L1Term(
                        strength=1e-4,
                        prox=True,
                        schedule=Schedule(steps=(WarmupStep(steps=100), FromStep(step=50), UntilStep(step=5000))),
                    ),
                ),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="fc2.*"),)),)),
                terms=(L2Term(strength=0.01, to="init", schedule=Schedule(steps=(CosineStep(end=1e-3, steps=10),))),),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="fc3.*"),)),)),
                terms=(L2Term(strength=0.5, to="ref"),),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="conv"),)),)),
                terms=(
                    GroupLassoTerm(
                        strength=2.0, dim=1, schedule=Schedule(steps=(UntilStep(step=7), WarmupStep(steps=3)))
                    ),
                ),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="conv2"),)),)),
                terms=(GroupLassoTerm(strength=2.0),),
            ),
            Rule(
                selector=Selector(atoms=(TypeAtom(patterns=(Pattern(text="Linear"),)),)),
                terms=(MaxNormTerm(norm=3.0, dim=-1),),
            ),
            Rule(
                selector=Selector(atoms=(AllAtom(),)),
                terms=(OrthogonalTerm(strength=1e-3, schedule=Schedule(steps=(FromStep(step=0),))),),
            ),
            Rule(
                selector=Selector(atoms=(TypeAtom(patterns=(Pattern(text="ReLU"),)),)),
                terms=(ActivityL1Term(strength=1e-5), ActivityL2Term(strength=2.0)),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=(Pattern(text="head.**"),)),)),
                terms=(
                    LrMultTerm(factor=0.1),
                    DecayTerm(strength=0.5, schedule=Schedule(steps=(CosineStep(end=0.0, steps=4),))),
                ),
            ),
            Rule(
                selector=Selector(atoms=(LayerAtom(patterns=tuple(Pattern(text=t) for t in ("from", "to", "dim"))),)),
                terms=(L1Term(strength=1.0),),
            ),
        )
    )
    assert spec == expected
    # == compares meaning; read the fields one by one too, so a wrong field name cannot hide.
    rules = spec.statements
    l1 = rules[0].terms[0]
    assert (l1.kind, l1.strength, l1.prox) == ("l1", 1e-4, True)
    assert [s.kind for s in l1.schedule.steps] == ["warmup", "from", "until"]
    assert l1.schedule.get("warmup").steps == 100 and type(l1.schedule.get("warmup").steps) is int
    assert l1.schedule.get("from").step == 50 and type(l1.schedule.get("from").step) is int
    assert l1.schedule.get("until").step == 5000
    assert l1.schedule.get("cosine") is None
    assert (rules[1].terms[0].to, rules[2].terms[0].to) == ("init", "ref")
    cosine = rules[1].terms[0].schedule.get("cosine")
    assert (cosine.end, cosine.steps) == (1e-3, 10)
    assert (rules[3].terms[0].dim, rules[4].terms[0].dim) == (1, 0)
    # Schedule steps keep the order they were written in.
    assert [s.kind for s in rules[3].terms[0].schedule.steps] == ["until", "warmup"]
    max_norm = rules[5].terms[0]
    assert (max_norm.kind, max_norm.norm, max_norm.value, max_norm.dim) == ("max_norm", 3.0, 3.0, -1)
    assert [t.kind for t in rules[7].terms] == ["activity_l1", "activity_l2"]
    assert (rules[8].terms[0].kind, rules[8].terms[0].factor, rules[8].terms[0].value) == ("lr_mult", 0.1, 0.1)
    # Terms without options or a schedule get the defaults.
    plain = regdsl.parse("all l1 1 l2 1").statements[0].terms
    assert (plain[0].prox, plain[1].to, plain[0].schedule.steps, plain[1].schedule.steps) == (False, None, (), ())


def test_new_terms_print_canonically():
    assert regdsl.parse(NEW_TERMS_TEXT).to_source() == (
        "all l1 0.0001 prox warmup 100 from 50 until 5000\n"
        "layer fc2.* l2 0.01 to init cosine to 0.001 over 10\n"
        "layer fc3.* l2 0.5 to ref\n"
        "layer conv group_lasso 2.0 dim=1 until 7 warmup 3\n"
        "layer conv2 group_lasso 2.0\n"
        "type Linear max_norm 3.0 dim=-1\n"
        "all orthogonal 0.001 from 0\n"
        "type ReLU activity l1 1e-05 activity l2 2.0\n"
        "layer head.** lr_mult 0.1 decay 0.5 cosine to 0.0 over 4\n"
        "layer from, to, dim l1 1.0\n"
    )


@pytest.mark.parametrize(
    ("text", "line", "column", "end_column", "code", "mentions"),
    [
        # A bad number: the caret covers the number.
        ("all l1 1 warmup 0", 1, 17, 18, "RD007", "warmup must be >= 1"),
        ("all l1 1 warmup 1.5", 1, 17, 20, "RD007", "whole number"),
        ("all l2 1 from -1", 1, 15, 17, "RD007", "from must be >= 0"),
        ("all l2 1 until 0", 1, 16, 17, "RD007", "until must be >= 1"),
        ("all l1 1 cosine to 0 over 0", 1, 27, 28, "RD007", "must be >= 1"),
        ("all l1 1 cosine to -2 over 9", 1, 20, 22, "RD004", ">= 0"),
        ("all group_lasso 1 dim=0.5", 1, 23, 26, "RD007", "dim must be a whole number"),
        ("all max_norm 1 dim = 2.5", 1, 22, 25, "RD007", "dim must be a whole number"),
        ("all max_norm 0", 1, 14, 15, "RD004", "max_norm"),
        # A bad step: the caret covers the whole step.
        ("all decay 1 from 10 until 5", 1, 21, 28, "RD007", "until 5 must come after from 10"),
        ("all decay 1 until 10 from 10", 1, 13, 21, "RD007", "until 10 must come after from 10"),
        ("all l1 1 warmup 5 from 1 warmup 6", 1, 26, 34, "RD007", "'warmup' appears twice"),
        ("all l1 1 cosine to 0 over 3 cosine to 1 over 4", 1, 29, 47, "RD007", "'cosine' appears twice"),
        # Earlier statements and lines do not move the position.
        ("all l2 1\nall l2 1; all l1 1 from 3 until 2 warmup 1", 2, 27, 34, "RD007", "until 2 must come after"),
    ],
)
def test_schedule_and_option_errors_point_at_the_offender(text, line, column, end_column, code, mentions):
    err = errors_of(text)
    assert type(err) is RegValidationError
    (d,) = err.diagnostics
    assert (d.line, d.column, d.end_line, d.end_column) == (line, column, line, end_column), d
    assert d.code == code
    assert mentions in d.message, d.message
    assert_user_words(err)


def test_activity_on_bias_points_at_bias():
    err = errors_of("layer fc1 bias activity l1 1")
    (d,) = err.diagnostics
    assert (d.line, d.column, d.end_column, d.code) == (1, 11, 15, "RD008")
    assert "'bias'" in d.message and "activity l1" in d.message
    # Two activity kinds are two terms, not a duplicate.
    (rule,) = regdsl.parse("layer fc1 activity l1 1 activity l2 1").statements
    assert [t.kind for t in rule.terms] == ["activity_l1", "activity_l2"]


@pytest.mark.parametrize(
    ("text", "column", "word"),
    [
        ("all max_norm 1 warmup 10", 16, "'warmup'"),
        ("all lr_mult 2 from 5", 15, "'from'"),
        ("all l1 1 to init", 10, "'to'"),
        ("all l2 1 prox", 10, "'prox'"),
        ("all group_lasso 1 dim 1", 23, "'1'"),
        ("all l1 1 from 5 prox", 17, "'prox'"),
    ],
)
def test_misplaced_options_are_syntax_errors(text: str, column: int, word: str):
    err = errors_of(text)
    assert type(err) is RegSyntaxError
    (d,) = err.diagnostics
    assert (d.line, d.column, d.code) == (1, column, "RD001")
    assert d.message.startswith(f"unexpected {word}")
    assert_user_words(err)


SCHEDULED_TEXT = (
    "all l1 1e-4 prox warmup 100 from 50 until 5000\n"
    "layer fc.* l2 0.5 to init cosine to 0.01 over 300 warmup 7; type Linear max_norm 2 dim=1\n"
    "type ReLU activity l2 3 until 9 lr_mult 0 group_lasso 1 dim=-2 from 1\n"
)


def test_from_json_round_trips_schedules_and_options():
    spec = regdsl.parse(SCHEDULED_TEXT, "sched.reg")
    data = spec.to_json()
    back = Spec.from_json(data)
    assert back == spec
    assert back.model_dump() == spec.model_dump()
    assert back.to_source() == spec.to_source()
    # Step counts stay integers in JSON, and the schedule keeps its written order and positions.
    raw = json.loads(data)
    l1 = raw["statements"][0]["terms"][0]
    assert l1["prox"] is True
    assert [(s["kind"], s.get("steps", s.get("step"))) for s in l1["schedule"]["steps"]] == [
        ("warmup", 100),
        ("from", 50),
        ("until", 5000),
    ]
    assert all(type(s.get("steps", s.get("step"))) is int for s in l1["schedule"]["steps"])
    cosine = back.statements[1].terms[0].schedule.steps[0]
    assert (cosine.kind, cosine.end, cosine.steps) == ("cosine", 0.01, 300)
    assert (cosine.pos.line, cosine.pos.column) == (2, 27)
    assert back.statements[2].terms[0].dim == 1
    group_lasso = back.statements[3].terms[2]
    assert (group_lasso.dim, group_lasso.schedule.get("from").step) == (-2, 1)
    # A spec built by hand, with no positions, survives JSON as well.
    by_hand = Spec(
        statements=(
            Rule(
                selector=Selector(atoms=(AllAtom(),)),
                terms=(
                    OrthogonalTerm(
                        strength=1.0,
                        schedule=Schedule(steps=(CosineStep(end=0.5, steps=3), UntilStep(step=4), FromStep(step=2))),
                    ),
                ),
            ),
        )
    )
    assert Spec.from_json(by_hand.to_json()) == by_hand


@pytest.mark.parametrize(
    ("schedule", "mentions"),
    [
        ([{"kind": "warmup", "steps": 0}], "warmup must be >= 1"),
        ([{"kind": "from", "step": 3}, {"kind": "until", "step": 3}], "until 3 must come after from 3"),
        ([{"kind": "until", "step": 1}, {"kind": "until", "step": 2}], "appears twice"),
        ([{"kind": "sometimes"}], "sometimes"),
    ],
    ids=["warmup-0", "until-not-after-from", "twice", "unknown-kind"],
)
def test_from_json_of_bad_schedule_is_a_validation_error(schedule, mentions: str):
    term = {"kind": "l1", "strength": 1, "schedule": {"steps": schedule}}
    data = json.dumps({"statements": [{"kind": "rule", "selector": _ALL, "terms": [term]}]})
    with pytest.raises(RegValidationError) as info:
        Spec.from_json(data)
    assert any(mentions in d.message for d in info.value.diagnostics), [d.message for d in info.value.diagnostics]


@pytest.mark.parametrize(
    "term",
    [
        {"kind": "l1", "strength": 1, "schedule": {"steps": [{"kind": "warmup", "steps": "5"}]}},
        {"kind": "l1", "strength": 1, "schedule": {"steps": [{"kind": "from", "step": None}]}},
        {"kind": "group_lasso", "strength": 1, "dim": "1"},
        {"kind": "max_norm", "norm": 1, "dim": None},
    ],
    ids=["warmup-str", "from-null", "dim-str", "dim-null"],
)
def test_from_json_of_non_numeric_step_is_a_validation_error(term):
    data = json.dumps({"statements": [{"kind": "rule", "selector": _ALL, "terms": [term]}]})
    with pytest.raises(RegValidationError):
        Spec.from_json(data)


def _json_warmup(steps: int) -> str:
    return (
        '{"statements": [{"kind": "rule", "selector": {"atoms": [{"kind": "all"}]}, "terms": [{"kind": "l1", '
        '"strength": 1, "schedule": {"steps": [{"kind": "warmup", "steps": ' + str(steps) + "}]}}]}]}"
    )


def test_from_json_of_huge_step_is_kept_whole():
    # Step counts are whole numbers up to 2**63 - 1, in JSON as in text: nothing rounds them through a float.
    spec = Spec.from_json(_json_warmup(2**63 - 1))
    assert spec.statements[0].terms[0].schedule.steps[0].steps == 2**63 - 1
    assert regdsl.parse(spec.to_source()) == spec


def test_from_json_of_step_beyond_int64_is_out_of_range():
    # 10**400 once validated, then broke the schedule's float arithmetic at compile time.
    with pytest.raises(RegValidationError) as info:
        Spec.from_json(_json_warmup(10**400))
    (d,) = info.value.diagnostics
    assert d.code == "RD007" and "out of range" in d.message


def test_step_count_beyond_float_precision_round_trips_or_is_refused():
    # Either the model refuses a step count the text cannot carry, or the text carries it.
    try:
        spec = Spec(
            statements=(
                Rule(
                    selector=Selector(atoms=(AllAtom(),)),
                    terms=(L1Term(strength=1.0, schedule=Schedule(steps=(WarmupStep(steps=2**53 + 1),))),),
                ),
            )
        )
    except pydantic.ValidationError:
        return
    assert regdsl.parse(spec.to_source()) == spec


@pytest.mark.parametrize("before", ["all l2 ", "all l2 1 warmup ", "all group_lasso 1 dim="])
def test_a_long_digit_run_ending_in_a_letter_is_one_error_read_in_one_pass(before: str) -> None:
    # A number pattern that could split its digits two ways tried every split at each position:
    # 4,000 digits took 1.7 s, so these 30,000 would take minutes.
    digits = "1" * 30_000
    with pytest.raises(regdsl.RegSyntaxError) as info:
        regdsl.parse(before + digits + "x")
    ((d,),) = [info.value.diagnostics]
    assert (d.code, d.line, d.column) == ("RD001", 1, len(before) + 1)
