"""The compiler, the parser and the linter scale (issue 9, point 6), shown without a clock.

Work is counted, not timed: the lines of regdsl's own code that run (``sys.settrace``),
the regex matches a layer pattern makes, the globs compiled. Each count is taken for a
size N and for 2N; linear work grows by about 2x, the quadratic passes these tests
replaced grew by 4x. The timings themselves are benchmarks/scaling.py's.

Fast paths must not change what anything means: the whole-table matcher is checked
against the one-entry definition (``atom_matches``, ``module_matches``), and RD103 against
the quadratic definition it replaced.
"""

from __future__ import annotations

import difflib
import os
import random
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import MLP, TinyTransformer, gpt2
from torch import nn

import regdsl
from regdsl import matching
from regdsl import unmatched as unmatched_module
from regdsl.diagnose import diagnose
from regdsl.glob import GlobError, glob_regex, glob_source
from regdsl.resolution import resolve
from regdsl.select import ParamTable, atom_matches, module_matches
from regdsl.unmatched import _Nearest

PACKAGE = os.path.dirname(regdsl.__file__)
LINEAR = 2.2  # the most a count may grow when the size doubles


def lines_run(fn: Callable[[], Any]) -> int:
    """How many lines of regdsl's own code run during ``fn()``: deterministic, unlike a clock."""
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        if event == "line":
            count += 1
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def fresh_caches() -> None:
    # Compiled globs outlive a call; each measurement starts from none.
    glob_source.cache_clear()
    glob_regex.cache_clear()
    matching.prefix_regex.cache_clear()


def growth(measure: Callable[[int], int], n: int) -> float:
    measure(n)  # warm what is cached per class or per process, for both sizes alike
    small, large = measure(n), measure(2 * n)
    assert small > 0
    return large / small


class Stack(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(layers)])


def stack(layers: int) -> nn.Module:
    with torch.device("meta"):
        return Stack(layers)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))


class Blocks(nn.Module):
    """Blocks and a head tied to the embedding (RD203 looks at every tied tensor against every line)."""

    def __init__(self, n: int = 12):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


THREE_RULES = "all decay 0.05\nexclude bias\nlayer layers.1*.** l1 1e-5\n"

# Every line its own selector, as generated files have: literal names, globs, several patterns,
# type and norm atoms, excludes, 'none', schedules, and rules that later lines override.
PER_BLOCK = [
    "layer blocks.{i}.attn l2 1e-4 warmup 10",
    "layer blocks.{i}.mlp.* decay 0.01",
    "layer blocks.{i}.mlp.0, blocks.{i}.mlp.2 l1 1e-5",
    "layer blocks.{i}.ln.** type LayerNorm decay 0",
    "layer blocks.{i}.mlp.0.weight group_lasso 1e-4 dim=1",
    'layer "blocks.{i}.attn.*" orthogonal 1e-4',  # the bias is 1-D: RD104
    "layer blocks.{i}.mlp.*.bias none",
    "exclude layer blocks.{i}.ln.bias",
    "layer blocks.{i}.** lr_mult 0.5",
    "layer blocks.{i}.mlp.2 l1 1e-6 prox",
    "layer blocks.{i}.attn.bias decay 0.02 until 100",
    "layer blocks.{i}.nothing l2 1",
    "norm layer blocks.{i}.* l2 1e-3",
    "layer embed decay 0.1",
    "layer head.weight l2 1e-5",
]


def rule_file(lines: int, blocks: int = 12) -> str:
    out = ["all decay 0.05", "exclude embedding"]
    k = 0
    while len(out) < lines:
        out.append(PER_BLOCK[k % len(PER_BLOCK)].format(i=(k // len(PER_BLOCK)) % blocks))
        k += 1
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- compile: linear in the tensors


def test_compile_work_grows_linearly_with_the_tensors() -> None:
    spec = regdsl.parse(THREE_RULES)
    models = {n: stack(n) for n in (150, 300)}

    def measure(n: int) -> int:
        fresh_caches()
        return lines_run(lambda: regdsl.compile(spec, models[n]))

    assert growth(measure, 150) <= LINEAR


def test_compile_makes_rows_only_for_what_it_reads() -> None:
    # explain's rows are made when read: compile() reads one row per outcome at most, so a model of
    # 600 tensors under three rules makes a handful, and the rows read later are the eager ones.
    model = stack(300)
    reg = regdsl.parse(THREE_RULES).compile(model)
    rows = reg.resolution.rows
    assert len(rows) == 600
    assert sum(row is not None for row in rows._rows) <= 8
    named = dict(model.named_parameters())
    for row in rows:
        assert row.shape == tuple(named[row.name].shape) and row.numel == named[row.name].numel()
        want = {"decay"} if row.name.endswith("weight") else set()
        if row.name.startswith("layers.1") and row.name.endswith("weight"):
            want.add("l1")
        assert set(row.terms) == want, row.name
        assert (row.excluded_by is not None) == row.name.endswith("bias")
    assert rows[-1] is rows[599] and rows[:2] == (rows[0], rows[1])
    assert rows == tuple(rows) and rows == resolve(regdsl.parse(THREE_RULES), model).rows


def test_each_name_is_matched_once_per_distinct_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer pattern costs one match per tensor name, never one per prefix of every name,
    and a pattern on many lines is matched once."""
    calls: list[str] = []
    original = matching.prefix_regex

    class Counting:
        def __init__(self, text: str):
            self.regex = original(text)

        def fullmatch(self, name: str) -> Any:
            calls.append(name)
            return self.regex.fullmatch(name)

    monkeypatch.setattr(matching, "prefix_regex", Counting)
    model = stack(100)
    spec = regdsl.parse("layer layers.1*.** l1 1e-5\n" * 50 + "all decay 0.1\n")
    resolution = resolve(spec, model)
    diagnose(resolution)
    assert len(calls) == len(resolution.table.entries) == 200


def test_a_repeated_pattern_is_compiled_once() -> None:
    fresh_caches()
    spec = regdsl.parse("layer layers.*.weight l2 1e-4\nlayer layers.1?.bias decay 0\n" * 500)
    resolution = resolve(spec, stack(30))
    diagnose(resolution)
    assert matching.prefix_regex.cache_info().misses == 2
    assert glob_source.cache_info().currsize == 2


def test_generated_patterns_compile_a_regex_per_distinct_wildcard_tail() -> None:
    """Generated files name modules literally, or by globs that differ only in their literal part;
    past the first few, these are found in a sorted index by that part, and a literal needs no regex."""
    fresh_caches()
    lines = "".join(f"layer blocks.{i % 12}.mlp.{2 * (i // 12 % 2)}.weight l2 1e-{1 + i % 5}\n" for i in range(600))
    resolution = resolve(regdsl.parse(lines), Blocks())
    diagnose(resolution)
    assert matching.prefix_regex.cache_info().misses == matching._SCANS_BEFORE_INDEX
    assert glob_regex.cache_info().misses == 0
    fresh_caches()
    lines = "".join(f"layer blocks.{i % 12}.mlp.* l2 1e-{1 + i % 5}\nlayer blocks.{i % 12}.*.bias decay 0\n" for i in range(600))
    resolution = resolve(regdsl.parse(lines), Blocks(12))
    diagnose(resolution)
    assert matching.prefix_regex.cache_info().misses <= matching._SCANS_BEFORE_INDEX + 2  # the tails '*' and '*.bias'
    assert glob_regex.cache_info().misses == 0


# ---------------------------------------------------------------- check: linear in the statements


def test_check_work_grows_linearly_with_the_statements() -> None:
    model = Blocks()
    specs = {n: regdsl.parse(rule_file(n)) for n in (300, 600)}

    def measure(n: int) -> int:
        fresh_caches()
        return lines_run(lambda: diagnose(resolve(specs[n], model)))

    found = {d.code for d in diagnose(resolve(specs[300], model))}
    assert {"RD101", "RD103", "RD104", "RD203"} <= found  # the passes that used to be quadratic all ran
    assert growth(measure, 300) <= LINEAR


def test_dead_rule_search_is_linear_when_every_rule_is_overridden() -> None:
    """Each line overrides the one before: the old search scanned every later line for each."""
    model = MLP()
    specs = {n: regdsl.parse("".join(f"all decay 0.{k + 1}\n" for k in range(n))) for n in (400, 800)}

    def measure(n: int) -> int:
        resolution = resolve(specs[n], model)
        return lines_run(lambda: diagnose(resolution))

    assert growth(measure, 400) <= LINEAR
    assert sum(d.code == "RD103" for d in diagnose(resolve(specs[400], model))) == 399


def test_activity_selection_grows_linearly_with_the_statements() -> None:
    model = Blocks()
    lines = [f"layer blocks.{i % 12}.mlp.{2 * (i % 2)} activity l1 1e-{1 + i % 4}" for i in range(800)]
    specs = {n: regdsl.parse("\n".join(lines[:n]) + "\n") for n in (400, 800)}

    def measure(n: int) -> int:
        fresh_caches()
        return lines_run(lambda: diagnose(resolve(specs[n], model)))

    assert growth(measure, 400) <= LINEAR


# ---------------------------------------------------------------- parse: linear in the lines


@pytest.mark.parametrize(
    "line",
    [
        "layer blocks.{k}.attn.* l2 1e-4 warmup 100 until 900",
        'type Linear, "my.Layer{k}" group_lasso 1e-3 dim=1 cosine to 1e-5 over 10',
        "layer x{k} l2 -1",  # a validation error on every line
        "layer x{k} l2 @",  # a syntax error on every line
    ],
)
def test_parse_work_grows_linearly_with_the_lines(line: str) -> None:
    texts = {n: "".join(line.format(k=k) + "\n" for k in range(n)) for n in (400, 800)}

    def measure(n: int) -> int:
        fresh_caches()

        def run() -> None:
            try:
                regdsl.parse(texts[n])
            except regdsl.RegDslError:
                pass

        return lines_run(run)

    assert growth(measure, 400) <= LINEAR


# ---------------------------------------------------------------- the fast paths mean what the definitions say


def _selectors(model: nn.Module, rng: random.Random) -> list[str]:
    names = sorted({n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules() if n})
    classes = sorted({type(m).__name__ for m in model.modules()}) + ["*Norm", "Module", "torch.nn.Linear", "Nope"]

    def glob(name: str) -> str:
        parts = name.split(".")
        return rng.choice(
            [name, ".".join([*parts[:-1], "*"]), f"{parts[0]}.**", f"**.{parts[-1]}", name[: len(name) // 2 + 1] + "*",
             name.replace("0", "[0-1]").replace("1", "?"), f"{name}.**", "nope"]
        )

    out = []
    for _ in range(60):  # past _SCANS_BEFORE_INDEX distinct patterns: both the scan and the index run
        atoms = []
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(["all", "layer", "layer", "layer", "type", "bias", "norm", "embedding"])
            if kind == "layer":
                atoms.append("layer " + ", ".join(f'"{glob(rng.choice(names))}"' for _ in range(rng.randint(1, 2))))
            elif kind == "type":
                atoms.append("type " + rng.choice(classes))
            else:
                atoms.append(kind)
        out.append(" ".join(atoms))
    return out


@pytest.mark.parametrize("build", [MLP, TinyTransformer, Blocks, gpt2], ids=["mlp", "transformer", "blocks", "gpt2"])
def test_the_table_matcher_agrees_with_the_one_entry_definitions(build: Callable[[], nn.Module]) -> None:
    model = build()
    selectors = _selectors(model, random.Random(0))
    spec = regdsl.parse("".join(f"{s} decay 0.1\n" for s in selectors))
    table = ParamTable(model)
    for statement in spec.statements:
        atoms = statement.selector.atoms
        expected = tuple(e.index for e in table.entries if all(atom_matches(a, e) for a in atoms))
        assert table.matcher.params(statement.selector) == expected, statement
        expected_modules = tuple(
            i for i, (name, module) in enumerate(table.modules) if all(module_matches(a, name, module) for a in atoms)
        )
        assert table.matcher.modules(statement.selector) == expected_modules, statement


def _dead_rules_by_definition(resolution: Any) -> list[tuple[int, str]]:
    """RD103 as first written: for each rule, each parameter, each kind, scan every later statement."""
    from regdsl.spec import NOT_REGULARIZERS, PARAM_TERMS, Exclude, NoneTerm, Rule
    from regdsl.unmatched import acts_on_modules, acts_on_params

    statements = resolution.spec.statements
    entries = resolution.table.entries
    trainable = [{i for i in m if entries[i].trainable} for m in resolution.matches]
    excluded_by: dict[int, list[int]] = {}
    for index, statement in enumerate(statements):
        if isinstance(statement, Exclude):
            for i in trainable[index]:
                excluded_by.setdefault(i, []).append(index)
    out = []
    for index, statement in enumerate(statements):
        if not isinstance(statement, Rule) or not trainable[index] or not acts_on_params(statement):
            continue
        if acts_on_modules(statement) or all(isinstance(t, NoneTerm) for t in statement.terms):
            continue
        kinds = {t.kind for t in statement.terms if t.kind in PARAM_TERMS}
        if any(isinstance(t, NoneTerm) for t in statement.terms):
            kinds |= {k for k in PARAM_TERMS if k not in NOT_REGULARIZERS}
        overriders, excluders, dead = set(), set(), True
        for i in trainable[index]:
            for kind in kinds:
                if i in excluded_by and kind not in NOT_REGULARIZERS:
                    excluders.update(excluded_by[i])
                    continue
                later = [
                    j for j in range(index + 1, len(statements))
                    if i in trainable[j] and isinstance(statements[j], Rule)
                    and any(t.kind == kind or (t.kind == "none" and kind not in NOT_REGULARIZERS) for t in statements[j].terms)
                ]
                if not later:
                    dead = False
                    break
                overriders.add(later[-1])
            if not dead:
                break
        if dead:
            lines = lambda which: sorted({statements[j].pos.line for j in which})
            out.append((statement.pos.line, f"{lines(overriders)} {lines(excluders)}"))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_dead_rules_agree_with_the_quadratic_definition(seed: int) -> None:
    rng = random.Random(seed)
    model = Blocks(3)
    lines = rule_file(45, blocks=3).splitlines()
    rng.shuffle(lines)
    lines += ["all none", "exclude bias", "layer blocks.1.** none l2 1e-3", "type Linear lr_mult 2"]
    spec = regdsl.parse("\n".join(lines) + "\n")
    resolution = resolve(spec, model)
    expected = _dead_rules_by_definition(resolution)
    found = [d for d in diagnose(resolution) if d.code == "RD103"]
    assert [d.line for d in found] == [line for line, _ in expected]
    assert expected, "the file should have rules that later lines override"
    for d, (_, lines_of) in zip(found, expected):
        overridden, excluded = lines_of.split("] [")
        for number in filter(None, overridden.strip("[]").split(", ")):
            assert number in d.message
        for number in filter(None, excluded.strip("[]").split(", ")):
            assert number in d.message


SEGMENT = st.text(alphabet="ab1*?", min_size=1, max_size=3) | st.sampled_from(["**", "[ab]", "[!a]", "x"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(SEGMENT, min_size=1, max_size=4).map(".".join),
    st.lists(st.text(alphabet="ab1x", min_size=1, max_size=3), min_size=1, max_size=4).map(".".join),
)
def test_a_glob_split_into_head_and_tail_means_the_whole_glob(text: str, name: str) -> None:
    try:
        regex = glob_regex(text)
    except GlobError:
        return
    glob = matching.Glob(text)
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    assert glob.names(name) == bool(regex.fullmatch(name)), glob.form
    assert glob.under(name) == any(regex.fullmatch(p) for p in prefixes), glob.form
    assert name.startswith(glob.head) or not glob.under(name)


def test_patterns_that_match_nothing_grow_linearly() -> None:
    """A file written for another version of a model misses with every line; each pattern's
    suggestions must not cost a SequenceMatcher per name of the model."""
    model = Blocks(40)
    lines = [f"layer block.{i}.mlp.{i % 3} decay 0.1" for i in range(400)]  # 'blocks', not 'block'
    specs = {n: regdsl.parse("\n".join(lines[:n]) + "\n") for n in (200, 400)}

    def measure(n: int) -> int:
        resolution = resolve(specs[n], model)
        return lines_run(lambda: diagnose(resolution))

    found = diagnose(resolve(specs[200], model))
    assert all("nearest: 'blocks." in d.message for d in found if d.code == "RD101")
    assert growth(measure, 200) <= LINEAR


def test_suggestions_compare_few_names_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact ratios are taken only while a name's bound can still reach the third best."""
    made = []
    original = difflib.SequenceMatcher

    def counting(*args: Any) -> difflib.SequenceMatcher:
        made.append(args)
        return original(*args)

    monkeypatch.setattr(unmatched_module.difflib, "SequenceMatcher", counting)
    resolution = resolve(regdsl.parse("layer block.7.mlp.2 decay 0.1\n"), Blocks(40))
    paths = len(resolution.table.matcher.all_paths)
    assert "nearest: 'blocks.7.mlp.2'" in diagnose(resolution)[0].message
    assert len(made) < paths / 10


def _nearest_by_definition(text: str, names: list[str], limit: int = 3) -> str:
    scored = []
    for name in names:
        matcher = difflib.SequenceMatcher(None, text, name)
        if matcher.real_quick_ratio() >= 0.5 and matcher.quick_ratio() >= 0.5 and (ratio := matcher.ratio()) >= 0.5:
            scored.append((-ratio, name))
    close = [name for _, name in sorted(scored)[:limit]]
    return f"; nearest: {', '.join(repr(c) for c in close)}" if close else ""


NAME = st.text(alphabet="ab.1_", max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(NAME, max_size=40, unique=True), st.lists(NAME.filter(bool), min_size=1, max_size=4))
def test_suggestions_are_difflibs_ranking(names: list[str], texts: list[str]) -> None:
    nearest = _Nearest()
    for text in texts:
        assert nearest(text, names) == _nearest_by_definition(text, names)
