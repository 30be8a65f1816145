"""regdsl.check(spec, model) and Resolution.coverage(): targeted API tests.

The golden corpus (test_check_golden.py) pins every message; these tests pin the
properties around it: severities, positions, suggestions, dead-rule line numbers,
RD104 at compile time, the meta device, and the coverage counts, each computed
here by hand or by a plain loop over ``model.named_parameters()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from check_models import FACTORIES, frozen_mlp, fsdp_flat, lazy, model_of, sparse
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from models import CNN, MLP, TinyTransformer
from torch import nn

import regdsl
from regdsl import RegCompileError
from regdsl.codes import CODES
from regdsl.resolution import resolve

GOLDEN = sorted((Path(__file__).parent / "data" / "check").glob("*.reg"))


def check(text: str, model: nn.Module) -> list[regdsl.Diagnostic]:
    return regdsl.check(regdsl.parse(text), model)


def full(d: regdsl.Diagnostic) -> tuple:
    # Diagnostic.__eq__ compares only (line, column); compare everything a user sees.
    return (d.line, d.column, d.end_line, d.end_column, d.severity, d.kind, d.code, d.message, d.source_line)


def codes(diagnostics: list[regdsl.Diagnostic]) -> list[str]:
    return [d.code for d in diagnostics]


# ---------------------------------------------------------------- clean files, severities, order


def test_clean_file_has_no_diagnostics():
    text = "all decay 0.05\nexclude bias\nlayer head l1 1e-5\nlayer fc2.weight l2 0\n"
    assert check(text, MLP()) == []
    # The same file with one misspelt glob is not clean: the [] above is not a vacuous result.
    assert codes(check(text.replace("layer head", "layer haed"), MLP())) == ["RD101"]


def test_clean_file_on_the_transformer_has_no_diagnostics():
    text = "all decay 0.1\nexclude bias\nexclude norm\nexclude embedding\nlayer blocks.*.mlp.** type Linear l1 1e-6\n"
    assert check(text, TinyTransformer()) == []


def test_severity_and_kind_come_from_the_code():
    text = (
        "all decay 0.1\n"
        "exclude layer fcx\n"  # RD201 warning
        "layer fcy l2 1\n"  # RD101 error
        "type Conv2d l1 1\n"  # RD102 error
        "layer fc1 l2 0.1\n"  # RD204 warning
    )
    diagnostics = check(text, MLP())
    assert codes(diagnostics) == ["RD201", "RD101", "RD102", "RD204"]
    assert [d.severity for d in diagnostics] == ["warning", "error", "error", "warning"]
    for d in diagnostics:
        assert d.severity == CODES[d.code].severity
        assert d.kind == "model"
        assert d.render().startswith(f"<string>:{d.line}:{d.column}: {d.severity}: {d.code} ")


def test_diagnostics_are_sorted_by_position_across_passes():
    # The passes run RD101 before RD204; the result is still in file order.
    text = "all decay 0.1 l2 0.1\nlayer fcx l1 1; layer fc9 l1 1\n"
    diagnostics = check(text, MLP())
    assert [(d.line, d.column, d.code) for d in diagnostics] == [(1, 15, "RD204"), (2, 7, "RD101"), (2, 23, "RD101")]


# ---------------------------------------------------------------- positions


@pytest.mark.parametrize(
    "text, code, line, column, covered",
    [
        ("layer fc1, fcx l2 1\n", "RD101", 1, 12, "fcx"),  # the bad glob, not the rule nor the good glob
        ("all decay 0.1\nlayer fc1 l1 1; layer hed.** l1 1\n", "RD101", 2, 23, "hed.**"),
        ('layer "fc9" l2 1\n', "RD101", 1, 7, '"fc9"'),  # a quoted glob: the span covers its quotes
        ("\tlayer  fc1 ,fcx l2 1\n", "RD101", 1, 14, "fcx"),  # a tab and odd spacing still count one column each
        ("all decay 0.1\nexclude layer fc2.bias, fc1.bais\n", "RD201", 2, 25, "fc1.bais"),
        ("type Linear, Conv2d l2 1\n", "RD102", 1, 14, "Conv2d"),
        ("all decay 0.1\nexclude type Dropout\n", "RD201", 2, 14, "Dropout"),
        ("layer fc1 embedding l2 1\n", "RD101", 1, 11, "embedding"),  # an atom: points at the atom
        ("all decay 0.1\nlayer fc1 type Linear norm l2 1\n", "RD101", 2, 23, "norm"),
    ],
)
def test_position_points_at_the_pattern_or_atom(text: str, code: str, line: int, column: int, covered: str):
    (d,) = check(text, MLP())
    assert (d.code, d.line, d.column) == (code, line, column)
    assert (d.end_line, d.end_column) == (line, column + len(covered))
    assert d.source_line == text.split("\n")[line - 1]
    assert d.source_line[d.column - 1 : d.end_column - 1] == covered
    # The caret of the rendered diagnostic is under the pattern, as wide as it.
    caret = d.render().split("\n")[2]
    assert caret.strip() == "^" * len(covered)
    assert len(caret) == len(d.source_line[: d.column - 1].expandtabs(1)) + len(covered)


def test_selector_that_never_holds_is_reported_at_the_selector():
    (d,) = check("all decay 1\nexclude layer conv2 bias\n", CNN())
    assert (d.code, d.line, d.column) == ("RD201", 2, 9)  # after 'exclude ', where the selector starts
    assert d.source_line[d.column - 1 : d.end_column - 1] == "layer conv2 bias"


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "text, model, nearest",
    [
        ("layer haed l2 1\n", MLP, "'head'"),
        ("layer fc2.wieght l2 1\n", MLP, "'fc2.weight'"),
        ("layer blocks.0.attn.in_proj_weigth l2 1\n", TinyTransformer, "'blocks.0.attn.in_proj_weight'"),
        ("type LayerNrom l2 1\n", TinyTransformer, "'LayerNorm'"),
        ("exclude layer pos_embd\n", TinyTransformer, "'pos_embed'"),
    ],
)
def test_unmatched_pattern_suggests_the_nearest_name(text: str, model: Callable[[], nn.Module], nearest: str):
    (d,) = check(text, model())
    assert d.code in ("RD101", "RD102", "RD201")
    match = re.search(r"; nearest: (.+)$", d.message)
    assert match, d.message
    assert match.group(1).split(", ")[0] == nearest


def test_no_suggestion_when_nothing_is_close():
    (d,) = check("layer zzzzzz l2 1\n", MLP())
    assert d.message == "layer pattern 'zzzzzz' matches no parameter or module"


def test_module_without_parameters_is_not_called_missing():
    # blocks.0.mlp.1 is the GELU of the first block: the module exists but holds no
    # parameter, so "matches no parameter or module" would send the user looking for a typo.
    model = TinyTransformer()
    assert isinstance(model.get_submodule("blocks.0.mlp.1"), nn.GELU)
    (d,) = check("layer blocks.0.mlp.1 l2 1\n", model)
    assert (d.code, d.column) == ("RD101", 7)
    assert "or module" not in d.message, d.message
    assert "no parameters" in d.message, d.message


# ---------------------------------------------------------------- RD103: dead rules


def dead(text: str, model: nn.Module | None = None) -> dict[int, str]:
    return {d.line: d.message for d in check(text, model or MLP()) if d.code == "RD103"}


def test_dead_rule_names_every_overriding_line():
    text = (
        "layer fc1 l2 0.1 decay 0.1\n"  # fc1.weight: l2 <- line 2, decay <- line 4; fc1.bias: excluded (3)
        "all l2 0.01\n"
        "exclude bias\n"
        "layer fc1.weight decay 0\n"
    )
    assert dead(text) == {
        1: "rule has no effect: every parameter it selects is overridden by lines 2, 4 or excluded by line 3"
    }


def test_dead_rule_overridden_by_a_later_none():
    assert dead("layer head l1 0.1 decay 0.2\nlayer head none\n") == {
        1: "rule has no effect: every parameter it selects is overridden by line 2"
    }


def test_exclude_kills_a_rule_wherever_it_stands():
    assert dead("exclude layer head\nlayer head.weight l2 1\n") == {
        2: "rule has no effect: every parameter it selects is excluded by line 1"
    }


@pytest.mark.parametrize(
    "text",
    [
        "layer fc* l2 0.1\nlayer fc1 l2 0.2\n",  # fc2 keeps line 1's l2
        "layer head l2 0.1 l1 0.1\nlayer head l2 0.2\n",  # l1 is not overridden
        "layer head l2 0.1\nlayer head decay 0.2\n",  # another kind does not override
        "layer head l2 0.1\nlayer fc1 none\n",  # a none on other parameters
        "layer fc1 none\nall decay 0.1\n",  # a pure 'none' rule is not judged
        "all l2 0.1\nlayer head.weight l2 0.2\nexclude layer head.bias\n",
    ],
)
def test_rule_with_a_surviving_effect_is_not_dead(text: str):
    assert dead(text) == {}


def test_rule_overridden_only_on_frozen_parameters_counts_only_trainable_ones():
    # fc1 is frozen: line 1's trainable parameters are fc2's, which line 2 overrides.
    assert dead("layer fc1, fc2 l2 0.1\nlayer fc2 l2 0.2\n", frozen_mlp()) == {
        1: "rule has no effect: every parameter it selects is overridden by line 2"
    }


def test_none_inside_a_rule_is_an_effect():
    # Line 2 clears fc1's decay (from line 1) before setting l2; line 3 overrides only the l2.
    # Deleting line 2 would give fc1 decay 0.1 again, so line 2 is not dead.
    text = "all decay 0.1\nlayer fc1 none l2 1\nlayer fc1 l2 2\n"
    res = resolve(regdsl.parse(text), MLP())
    assert "decay" not in res.rows[0].terms  # fc1.weight: the none took effect
    assert dead(text) == {}


# Every rule that RD103 calls dead can be deleted without changing what any parameter gets.

_SELECTORS = [
    "all",
    "layer fc1",
    "layer fc*",
    "layer head",
    "bias",
    "layer head.weight",
    "type Linear",
    "layer fc2.bias",
]
_TERMS = ["decay", "l1", "l2"]


def effect(text: str, model: nn.Module) -> list[tuple]:
    res = resolve(regdsl.parse(text), model)
    return [(row.name, row.excluded_by is not None, {k: s.value for k, s in row.terms.items()}) for row in res.rows]


@st.composite
def statements(draw: st.DrawFn) -> str:
    selector = draw(st.sampled_from(_SELECTORS))
    if draw(st.integers(0, 5)) == 0:
        return f"exclude {selector}"
    kinds = draw(st.lists(st.sampled_from(_TERMS + ["none"]), min_size=1, max_size=3, unique=True))
    terms = " ".join(k if k == "none" else f"{k} {draw(st.sampled_from(['0', '0.1', '0.2']))}" for k in kinds)
    return f"{selector} {terms}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statements(), min_size=1, max_size=6))
@example(["all decay 0.1", "layer fc1 none l2 1", "layer fc1 l2 2"])
def test_deleting_a_dead_rule_changes_nothing(lines: list[str]):
    assert_dead_rules_deletable(lines, effect)


def assert_dead_rules_deletable(lines: list[str], effect_of: Callable[[str, nn.Module], list[tuple]]) -> None:
    model = MLP()
    text = "\n".join(lines) + "\n"
    before = effect_of(text, model)
    for line in dead(text, model):
        rest = "\n".join(s for i, s in enumerate(lines, start=1) if i != line) + "\n"
        assert effect_of(rest, model) == before, f"line {line} was called dead, but deleting it changes the result"


# ---------------------------------------------------------------- RD103 for activity terms

_EVERY_MODULE = "every module it selects is "
_MODULES = "rule has no effect: " + _EVERY_MODULE


class _Aliased(nn.Module):
    """One Linear registered as 'a' and as 'b' (so its parameters are one tied tensor under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.c = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("layer fc1 activity l2 1\nlayer fc1 activity l2 2\n", {1: _MODULES + "overridden by line 2"}),
        ("layer fc1 activity l2 1\ntype Linear activity l2 2\n", {1: _MODULES + "overridden by line 2"}),
        ("layer fc1 activity l1 1\nexclude layer fc1\n", {1: _MODULES + "excluded by line 2"}),
        ("layer fc1 activity l1 1\nlayer fc* none\n", {1: _MODULES + "overridden by line 2"}),
        (
            "layer fc1 l2 1 activity l2 1\nlayer fc1 l2 2 activity l2 2\n",
            {1: "rule has no effect: every parameter it selects is overridden by line 2, and " + _EVERY_MODULE + "overridden by line 2"},
        ),
        ("layer fc* activity l2 1\nlayer fc1 activity l2 2\n", {}),  # fc2 keeps line 1's
        ("layer fc1 activity l2 1\nlayer fc1 activity l1 2\n", {}),  # another kind adds to it
        ("layer fc1 l2 1 activity l2 1\nlayer fc1 activity l2 2\n", {}),  # its l2 on the weights holds
        ("layer fc1 activity l2 1 l2 1\nlayer fc1 l2 2\n", {}),  # its activity term holds
        ("layer fc1 activity l2 1 none\n", {}),  # its own 'none' clears it: the rule's doing, not a later line's
    ],
)
def test_an_activity_rule_that_later_lines_undo_is_dead(text: str, expected: dict[int, str]) -> None:
    # Before, a rule with an activity term was never judged: line 1 of the first case did nothing, silently.
    assert dead(text) == expected


def test_an_activity_rule_overridden_through_the_modules_other_name_is_dead_and_not_rd203() -> None:
    text = "layer a activity l2 1\nlayer b activity l2 2\n"
    found = [(d.line, d.code, d.message) for d in check(text, _Aliased())]
    # Activity terms act on the module's output, never on its tied weight: RD203 has nothing to say.
    assert found == [(1, "RD103", _MODULES + "overridden by line 2")]


def test_an_unmatched_activity_pattern_is_offered_a_modules_second_name() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 3)
            self.decoder_proj = self.encoder  # selected by either name, so either may be what was meant
            self.c = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.encoder(x))

    (d,) = check("layer decoder_prj activity l2 1\n", Shared())
    assert d.code == "RD101"
    assert d.message.endswith("; nearest: 'decoder_proj', 'encoder'"), d.message


@pytest.mark.parametrize(
    ("second", "consequence"),
    [
        ("layer b.weight l2 2", "this line's l2 replaces line 1's"),
        ("layer b.weight l2 2 decay 1", "this line's l2 replaces line 1's; the other terms of both apply"),
        ("layer b.weight l1 2", "the terms of both rules apply to the one tensor"),
        ("layer b.weight none", "this line's 'none' clears line 1's regularization terms from it"),
        ("exclude layer b.weight", "the exclude on line 2 removes every regularization term from it"),
    ],
)
def test_rd203_says_what_the_two_rules_do_to_the_tied_tensor(second: str, consequence: str) -> None:
    text = f"layer a.weight l2 1\n{second}\n"
    (d,) = [d for d in check(text, _Aliased()) if d.code == "RD203"]
    assert d.message == (
        "'b.weight' and 'a.weight' are one tied tensor, but line 1 selects it as 'a.weight' and this line as "
        f"'b.weight': {consequence}"
    )
    # What the message says, on the tensor itself (the later rule's same kind wins; other kinds add).
    terms = {k: s.value for k, s in resolve(regdsl.parse(text), _Aliased()).rows[0].terms.items()}
    if "replaces" in consequence:
        assert terms["l2"] == 2.0
    if "both apply" in consequence:
        assert len(terms) == 2


_ACTIVITY_SELECTORS = ["all", "layer fc1", "layer fc*", "layer head", "type Linear"]


@st.composite
def activity_statements(draw: st.DrawFn) -> str:
    selector = draw(st.sampled_from(_ACTIVITY_SELECTORS))
    if draw(st.integers(0, 5)) == 0:
        return f"exclude {selector}"
    kinds = draw(st.lists(st.sampled_from(["activity l1", "activity l2", "l2", "none"]), min_size=1, max_size=3, unique=True))
    terms = " ".join(k if k == "none" else f"{k} {draw(st.sampled_from(['0.1', '0.2']))}" for k in kinds)
    return f"{selector} {terms}"


def module_effect(text: str, model: nn.Module) -> list[tuple]:
    res = resolve(regdsl.parse(text), model)
    modules = {row.name: {k: s.value for k, s in row.terms.items()} for row in res.modules}
    return effect(text, model) + sorted((name, sorted(terms.items())) for name, terms in modules.items() if terms)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(activity_statements(), min_size=1, max_size=6))
def test_deleting_a_dead_activity_rule_changes_nothing(lines: list[str]) -> None:
    assert_dead_rules_deletable(lines, module_effect)


# ---------------------------------------------------------------- RD104 at check and at compile


RD104_CASES = [
    (
        lazy,
        "all l1 0\nlayer fc1.weight l2 1e-4\nlayer fc1.bias l1 1e-5 decay 0.01\nlayer head l2 1e-4\n",
        [(2, 18), (3, 16)],
    ),
    (sparse, "all decay 0.01\nexclude bias\nembedding l1 1e-5\n", [(1, 5)]),
    (fsdp_flat, "all decay 0.01\n", [(1, 5)]),
    # An RD104 next to warnings (RD204, RD201): compile raises for the RD104 only.
    (sparse, "all decay 0.01 l2 0.1\nexclude layer fcx\n", [(1, 5)]),
]


def snapshot(model: nn.Module) -> list[tuple]:
    def data(p: nn.Parameter) -> torch.Tensor | None:
        # An uninitialized (lazy) parameter has no data to copy; its class is recorded instead.
        return None if p.is_meta or isinstance(p, nn.parameter.UninitializedParameter) else p.detach().clone()

    return [
        (name, id(p), type(p).__name__, p.requires_grad, p.device.type, data(p))
        for name, p in model.named_parameters(remove_duplicate=False)
    ] + [
        (name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training)
        for name, m in model.named_modules()
    ]


def same_snapshot(a: list[tuple], b: list[tuple]) -> bool:
    def same(x: object, y: object) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        return x == y

    return len(a) == len(b) and all(len(x) == len(y) and all(map(same, x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("factory, text, positions", RD104_CASES, ids=["lazy", "sparse", "fsdp_flat", "with_warnings"])
def test_rd104_is_reported_by_check_and_raised_by_compile(factory, text: str, positions: list[tuple[int, int]]):
    spec = regdsl.parse(text)
    model = factory()
    found = [d for d in regdsl.check(spec, model) if d.code == "RD104"]
    assert [(d.line, d.column) for d in found] == positions
    assert all(d.severity == "error" for d in found)

    before = snapshot(model)
    with pytest.raises(RegCompileError) as info:
        spec.compile(model)
    assert [full(d) for d in info.value.diagnostics] == [full(d) for d in found]
    assert {d.code for d in info.value.diagnostics} == {"RD104"}
    # Nothing was half-applied: the model's parameters, flags and hooks are as they were.
    assert same_snapshot(snapshot(model), before)


def test_lazy_model_compiles_after_its_first_forward_pass():
    text = "all l1 0\nlayer fc1.weight l2 1e-4\nlayer fc1.bias l1 1e-5 decay 0.01\nlayer head l2 1e-4\n"
    model = lazy()
    with pytest.raises(RegCompileError):
        regdsl.parse(text).compile(model)
    model(torch.zeros(2, 5))  # materializes fc1 (8x5 weight, 8 bias)
    assert check(text, model) == []
    reg = regdsl.parse(text).compile(model)
    w, b = model.fc1.weight.detach(), model.fc1.bias.detach()
    hw, hb = model.head.weight.detach(), model.head.bias.detach()
    expected = 1e-4 / 2 * (w**2).sum() + 1e-5 * b.abs().sum() + 1e-4 / 2 * ((hw**2).sum() + (hb**2).sum())
    torch.testing.assert_close(reg.penalty().detach(), expected)


@pytest.mark.parametrize(
    "text",
    [
        "all decay 0.01\nembedding decay 0\n",
        "all decay 0.01\nexclude embedding\n",
        "all decay 0.01\nlayer embed none\n",
        "embedding l2 1e-4 l1 1e-5\nlayer head decay 0.1\n",
    ],
)
def test_no_decay_on_a_sparse_embedding_is_fine(text: str):
    model = sparse()
    assert check(text, model) == []
    groups = regdsl.parse(text).compile(model).param_groups(lr=0.1)
    (decay_of_embed,) = [g["weight_decay"] for g in groups if any(p is model.embed.weight for p in g["params"])]
    assert decay_of_embed == 0.0


# ---------------------------------------------------------------- the meta device


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_meta_model_gives_the_same_diagnostics_as_cpu(path: Path):
    spec = regdsl.load(path)
    factory = FACTORIES[model_of(path)]
    with torch.device("meta"):
        on_meta = factory()
    assert {p.device.type for p in on_meta.parameters()} <= {"meta"}  # the context took effect
    assert [full(d) for d in regdsl.check(spec, on_meta)] == [full(d) for d in regdsl.check(spec, factory())]


# ---------------------------------------------------------------- coverage


def plain_coverage(model: nn.Module, status: Callable[[str], set[str] | str]) -> dict[str, tuple[int, int]]:
    """Counts from a loop over named_parameters() (which lists a tied tensor once).

    ``status(name)`` is written by hand for each case: "frozen", "excluded", or the
    set of term kinds with a strength above 0.
    """
    kinds = ("decay", "l1", "l2", "group_lasso", "orthogonal", "max_norm", "nothing", "excluded", "frozen")
    out = {k: [0, 0] for k in kinds}

    def add(key: str, n: int) -> None:
        out[key][0] += 1
        out[key][1] += n

    for name, p in model.named_parameters():
        s = status(name)
        assert (s == "frozen") == (not p.requires_grad), name
        if s in ("frozen", "excluded"):
            add(s, p.numel())
            if s == "excluded":
                add("nothing", p.numel())
            continue
        for kind in s:
            add(kind, p.numel())
        if not s:
            add("nothing", p.numel())
    return {k: tuple(v) for k, v in out.items()}


def coverage_of(text: str, model: nn.Module) -> dict[str, tuple[int, int]]:
    cov = resolve(regdsl.parse(text), model).coverage()
    counts = {k: (c.tensors, c.elements) for k, c in cov.terms.items()}
    for key in ("nothing", "excluded", "frozen"):
        c = getattr(cov, key)
        counts[key] = (c.tensors, c.elements)
    return counts


NO_NEW_TERMS = {"group_lasso": (0, 0), "orthogonal": (0, 0), "max_norm": (0, 0)}


def test_coverage_counts_structured_terms_but_not_lr_mult():
    # lr_mult is an optimizer setting: it survives the exclude, and a tensor with only lr_mult has "nothing".
    text = (
        "all decay 0.05\nexclude bias\nlayer fc1 group_lasso 0.1 max_norm 3\n"
        "layer fc2 orthogonal 1e-3 decay 0\nlayer head.** lr_mult 0.1\nlayer head.weight decay 0\n"
    )
    model = MLP()

    def status(name: str) -> set[str] | str:
        if name.endswith(".bias"):
            return "excluded"
        return {"fc1.weight": {"decay", "group_lasso", "max_norm"}, "fc2.weight": {"orthogonal"}, "head.weight": set()}[name]

    expected = plain_coverage(model, status)
    assert coverage_of(text, model) == expected
    assert expected["group_lasso"] == expected["max_norm"] == (1, 96)
    assert expected["orthogonal"] == (1, 256)
    assert expected["nothing"] == (4, 48 + 35)
    head_bias = next(r for r in resolve(regdsl.parse(text), model).rows if r.name == "head.bias")
    assert head_bias.excluded_by is not None and head_bias.terms["lr_mult"].value == 0.1


def test_coverage_mlp():
    text = "all decay 0.05\nexclude bias\nlayer head l1 1e-5\nlayer fc2 l2 0\nlayer fc1 decay 0\n"
    model = MLP()

    def status(name: str) -> set[str] | str:
        if name.endswith(".bias"):
            return "excluded"
        return {"fc1.weight": set(), "fc2.weight": {"decay"}, "head.weight": {"decay", "l1"}}[name]

    expected = plain_coverage(model, status)
    assert coverage_of(text, model) == expected
    # The same numbers by hand: fc1.weight 6x16=96, fc2.weight 16x16=256, head.weight 16x3=48, biases 16+16+3.
    assert expected == {
        "decay": (2, 256 + 48), "l1": (1, 48), "l2": (0, 0), **NO_NEW_TERMS,
        "nothing": (4, 96 + 35), "excluded": (3, 35), "frozen": (0, 0),
    }  # fmt: skip


def test_coverage_cnn_with_a_frozen_stem():
    text = "all decay 5e-4\nexclude norm\nlayer conv* l1 1e-6\nlayer head l2 1e-4 decay 0\n"
    model = CNN()
    model.conv1.requires_grad_(False)

    def status(name: str) -> set[str] | str:
        if name.startswith("conv1."):
            return "frozen"
        if name.startswith("bn"):
            return "excluded"
        return {"conv2.weight": {"decay", "l1"}, "head.weight": {"l2"}, "head.bias": {"l2"}}[name]

    expected = plain_coverage(model, status)
    assert coverage_of(text, model) == expected
    # conv1: 4x3x3x3 + 4; bn1: 4 + 4; conv2: 8x4x3x3; bn2: 8 + 8; head: 5x8 + 5.
    assert expected == {
        "decay": (1, 288), "l1": (1, 288), "l2": (2, 45), **NO_NEW_TERMS,
        "nothing": (4, 24), "excluded": (4, 24), "frozen": (2, 112),
    }  # fmt: skip


def test_coverage_transformer_counts_the_tied_tensor_once():
    text = (
        "all decay 0.1\n"
        "exclude bias\n"
        "exclude norm\n"
        "layer embed, lm_head l2 1e-4 decay 0\n"  # one tensor under both names
        "layer blocks.1.** l1 1e-5\n"
    )
    model = TinyTransformer()
    model.pos_embed.requires_grad_(False)

    def status(name: str) -> set[str] | str:
        if name == "pos_embed":
            return "frozen"
        if name == "embed.weight":
            return {"l2"}
        # 'bias' is a last segment 'bias' or ending in '_bias': attn.in_proj_bias is excluded too.
        if name.endswith((".bias", "_bias")) or re.search(r"\.ln(1|2|_f)\.|^ln_f\.", name):
            return "excluded"
        return {"decay", "l1"} if name.startswith("blocks.1.") else {"decay"}

    expected = plain_coverage(model, status)
    assert coverage_of(text, model) == expected
    # Per block: in_proj 48x16, out_proj.weight 16x16, mlp weights 2 x 16x64 = 3072 with decay;
    # ln1 16+16, in_proj_bias 48, out_proj.bias 16, ln2 16, mlp biases 64+16 = 192 excluded.
    # Plus ln_f 16+16 excluded.
    assert expected == {
        "decay": (8, 6144), "l1": (4, 3072), "l2": (1, 50 * 16), **NO_NEW_TERMS,
        "nothing": (16, 416), "excluded": (16, 416), "frozen": (1, 8 * 16),
    }  # fmt: skip
    # Every tensor lands in exactly one of: some term, nothing, frozen.
    rows = resolve(regdsl.parse(text), model).rows
    assert len(rows) == len(list(model.parameters())) == 26


def test_a_type_that_matches_nothing_is_said_once_for_parameter_and_activity_terms():
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    found = check("type ReLU l2 0.1 activity l1 0.1", model)
    assert [(d.code, d.column) for d in found] == [("RD102", 6)]
