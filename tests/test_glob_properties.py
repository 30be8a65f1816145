"""Dotted-path globs against a matcher written plainly here: ``**`` is any number of whole segments,
any other segment matches one segment as ``fnmatch`` would (``*``, ``?``). Globs with several
``**`` take their regex's atomic groups (regdsl.glob), which must change no match and no capture,
and must not backtrack through every split of a long name."""

from __future__ import annotations

import fnmatch
import functools
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from regdsl.glob import capture_regex, glob_regex, glob_source


def matches(pattern: list[str], name: list[str]) -> bool:
    @functools.cache
    def at(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(name)
        if pattern[i] == "**":
            return any(at(i + 1, k) for k in range(j, len(name) + 1))
        return j < len(name) and fnmatch.fnmatchcase(name[j], pattern[i]) and at(i + 1, j + 1)

    return at(0, 0)


SEGMENTS = st.sampled_from(["a", "b", "0", "ab", "a*", "*b", "*", "?", "**"])
NAMES = st.lists(st.sampled_from(["a", "b", "0", "ab", "ba", "bb"]), min_size=1, max_size=9)
# One segment with several '*' and fixed pieces between them (each piece an atomic group in the regex).
WILD = st.lists(st.sampled_from(["a", "b", "*", "?", "[ab]", "[!a]"]), min_size=1, max_size=7).map("".join).filter(lambda s: "**" not in s)
NAME_SEGMENTS = st.text(alphabet="ab0", min_size=1, max_size=8)


@settings(max_examples=600, deadline=None)
@given(st.lists(SEGMENTS, min_size=1, max_size=7), NAMES)
@example(["**", "a", "**", "b"], ["ab", "a", "b"])  # 'a' is where 'ab' begins: a group must end with its segment
@example(["a", "**", "b", "**", "b"], ["a", "bb", "b", "ab", "b"])
def test_globs_match_as_the_plain_matcher_does(pattern: list[str], name: list[str]) -> None:
    text = ".".join(pattern)
    assert (glob_regex(text).fullmatch(".".join(name)) is not None) == matches(pattern, name), glob_source(text)
    # A layer's reading: the glob, or it followed by any further segments.
    prefix = re.compile(f"(?:{glob_source(text)})(?:\\..*)?", re.DOTALL)
    assert (prefix.fullmatch(".".join(name)) is not None) == matches([*pattern, "**"], name)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "**", "{i}", "*"]), min_size=1, max_size=7), NAMES.map(lambda n: [*n, "1", "2"]))
def test_captures_bind_as_without_the_atomic_groups(pattern: list[str], name: list[str]) -> None:
    first = pattern.index("{i}") if "{i}" in pattern else -1
    text = ".".join(s for k, s in enumerate(pattern) if s != "{i}" or k == first)  # one capture of each name
    joined = ".".join([*name[:3], "7", *name[3:]])
    got = capture_regex(text).fullmatch(joined)
    plain = re.compile(f"(?:{glob_source(text, named=True).replace('(?>', '(?:')})(?:\\..*)?", re.DOTALL).fullmatch(joined)
    assert (got is None) == (plain is None)
    if got is not None and plain is not None:
        assert got.groupdict() == plain.groupdict()


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(WILD, st.just("**")), min_size=1, max_size=4), st.lists(NAME_SEGMENTS, min_size=1, max_size=4))
@example(["*a*b"], ["aab"])  # the first 'a' is kept: the '*' after it takes the second
@example(["*?*?b"], ["aab"])
@example(["a*[ab]*b"], ["abab"])
def test_segments_with_several_stars_match_as_fnmatch_does(pattern: list[str], name: list[str]) -> None:
    text = ".".join(pattern)
    assert (glob_regex(text).fullmatch(".".join(name)) is not None) == matches(pattern, name), glob_source(text)


def test_a_segment_of_many_stars_fails_a_long_name_without_trying_every_placement() -> None:
    # Each '*' a plain [^.]* made this take 4.8 s (10 pairs) and 18 s (12 pairs) on a 2-core machine.
    name = "abcdefghijklmnopqrstuvwxyz0123" * 3
    for pattern in ("*?" * 16 + "Z", "*a" * 16 + "Z"):
        assert glob_regex(pattern).fullmatch(name) is None
        assert not fnmatch.fnmatchcase(name, pattern)


def test_a_glob_of_many_double_stars_fails_a_long_name_without_trying_every_split() -> None:
    # Without the atomic groups, 8 such '**' took 22 s on a 2-core machine and each 2 more about 10x as
    # long: these 12 would not finish.
    name = ".".join(["0"] * 40) + ".weight"
    pattern = ".".join(["**", "0"] * 12) + ".**.bias"
    assert glob_regex(pattern).fullmatch(name) is None
    assert matches(pattern.split("."), name.split(".")) is False
