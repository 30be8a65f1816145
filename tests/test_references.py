"""References for ``l2 ... to ref`` are any state_dict-like mapping (issue 8, point 4).

Every expected penalty is written out here from the tensors themselves:
``λ/2 · Σ (w − w0)²`` over the referenced parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import MLP, TinyTransformer
from torch import nn
from torch.optim.swa_utils import AveragedModel

import regdsl

RULES = "layer fc1.weight, fc2.weight l2 0.5 to ref\n"


def plain_l2_to(model: nn.Module, w0: dict[str, torch.Tensor], names: list[str], lam: float) -> torch.Tensor:
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for name in names:
        total += lam / 2 * ((params[name].detach().double() - w0[name].double()) ** 2).sum()
    return total


def pretrained(seed: int = 1) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def rd105(text: str, model: nn.Module, reference: object) -> regdsl.Diagnostic:
    with pytest.raises(regdsl.RegCompileError) as caught:
        regdsl.parse(text, "ref.reg").compile(model, reference=reference)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "RD105" and diagnostic.file == "ref.reg" and diagnostic.severity == "error"
    assert diagnostic.source_line == text.split("\n")[diagnostic.line - 1]
    return diagnostic


def test_averaged_model_state_dict_is_a_reference() -> None:
    # AveragedModel keeps the model as .module and adds an n_averaged buffer that is no parameter.
    source = pretrained()
    swa = AveragedModel(source)
    state = swa.state_dict()
    assert "n_averaged" in state and all(k == "n_averaged" or k.startswith("module.") for k in state)
    model = pretrained(seed=2)
    reg = regdsl.parse(RULES).compile(model, reference=state)
    w0 = {name: p.detach().clone() for name, p in source.named_parameters()}
    expected = plain_l2_to(model, w0, ["fc1.weight", "fc2.weight"], 0.5)
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-6, atol=1e-8)


def test_ddp_checkpoint_with_extra_entries_is_a_reference() -> None:
    # A DDP checkpoint: every key under module., plus entries that are no parameter of the model.
    source = pretrained()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["epoch"] = 7
    state["module.running_stat"] = torch.ones(3)
    model = pretrained(seed=2)
    reg = regdsl.parse(RULES).compile(model, reference=state)
    w0 = dict(source.named_parameters())
    expected = plain_l2_to(model, w0, ["fc1.weight", "fc2.weight"], 0.5)
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-6, atol=1e-8)


def test_nested_wrappers_and_compiled_keys_are_read() -> None:
    source = pretrained()
    w0 = dict(source.named_parameters())
    state = {"module.module.fc1.weight": w0["fc1.weight"], "_orig_mod.fc2.weight": w0["fc2.weight"]}
    model = pretrained(seed=2)
    reg = regdsl.parse(RULES).compile(model, reference=state)
    expected = plain_l2_to(model, w0, ["fc1.weight", "fc2.weight"], 0.5)
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-6, atol=1e-8)


def test_a_key_as_written_wins_over_a_stripped_module_prefix() -> None:
    source = pretrained()
    w0 = dict(source.named_parameters())
    decoy = torch.full_like(w0["fc1.weight"], 100.0)
    state = {"fc1.weight": w0["fc1.weight"], "module.fc1.weight": decoy, "fc2.weight": w0["fc2.weight"]}
    model = pretrained(seed=2)
    reg = regdsl.parse(RULES).compile(model, reference=state)
    expected = plain_l2_to(model, w0, ["fc1.weight", "fc2.weight"], 0.5)
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "reference, what",
    [
        ([torch.zeros(16, 6)], "list"),
        (np.zeros((16, 6), dtype=np.float32), "ndarray"),
        (torch.zeros(16, 6), "Tensor"),
        (MLP(), "MLP"),
    ],
    ids=["list", "numpy", "bare_tensor", "module"],
)
def test_a_reference_that_is_no_mapping_is_a_positioned_error(reference: object, what: str) -> None:
    d = rd105(RULES, pretrained(), reference)
    assert (d.line, d.column) == (1, RULES.index("l2") + 1)  # the l2 term
    assert f"must be a mapping of parameter names to tensors (a state_dict), not a {what}" in d.message
    if what == "MLP":
        assert "pass model.state_dict()" in d.message


def test_a_referenced_entry_that_is_no_tensor_names_its_key() -> None:
    state = {"module.fc1.weight": np.zeros((16, 6)), "module.fc2.weight": torch.zeros(16, 16)}
    d = rd105(RULES, pretrained(), state)
    assert "the reference's 'module.fc1.weight' is a ndarray, not a tensor, for 'fc1.weight'" in d.message
    assert "fc2.weight" not in d.message


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_a_referenced_entry_of_another_kind_of_number_names_its_key(dtype: torch.dtype) -> None:
    # Before, a complex w0 compiled (its imaginary part dropped, torch's UserWarning only) where
    # load_state_dict refuses the same tensor.
    state = {"fc1.weight": torch.zeros(16, 6, dtype=dtype), "fc2.weight": torch.zeros(16, 16)}
    d = rd105(RULES, pretrained(), state)
    assert f"the reference's 'fc1.weight' is a {dtype} tensor, the parameter torch.float32, for 'fc1.weight'" in d.message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_a_referenced_entry_names_its_key(bad: float) -> None:
    w0 = dict(pretrained().named_parameters())
    poisoned = w0["fc2.weight"].detach().clone()
    poisoned[3, 4] = bad
    state = {"fc1.weight": w0["fc1.weight"], "fc2.weight": poisoned}
    d = rd105(RULES, pretrained(seed=2), state)
    assert "the reference's 'fc2.weight' holds NaN or infinite values, for 'fc2.weight'" in d.message
    assert "fc1.weight" not in d.message


def test_nan_in_an_entry_no_rule_reads_is_ignored() -> None:
    # Only what a 'to ref' rule looks up is judged: a NaN in another entry changes nothing.
    w0 = dict(pretrained().named_parameters())
    state = {**{k: v.detach() for k, v in w0.items()}, "fc3.weight": torch.full((3, 16), float("nan"))}
    model = pretrained(seed=2)
    reg = regdsl.parse(RULES).compile(model, reference=state)
    assert torch.isfinite(reg.penalty())


def test_check_and_compile_agree_on_reference_problems() -> None:
    # check() with the same reference reports exactly what compile() raises.
    spec = regdsl.parse(RULES, "ref.reg")
    model = pretrained()
    for reference in ([1, 2], {"fc1.weight": torch.zeros(2)}, {"fc1.weight": torch.zeros(16, 6)}):
        errors = [d for d in regdsl.check(spec, model, reference=reference) if d.severity == "error"]
        with pytest.raises(regdsl.RegCompileError) as caught:
            spec.compile(model, reference=reference)
        assert caught.value.diagnostics == errors and errors


def test_transformer_reference_from_a_ddp_checkpoint() -> None:
    torch.manual_seed(0)
    source = TinyTransformer()
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    torch.manual_seed(1)
    model = TinyTransformer()
    text = "layer blocks.*.mlp.* l2 0.25 to ref\nexclude bias\n"
    reg = regdsl.parse(text).compile(model, reference=state)
    names = [f"blocks.{i}.mlp.{j}.weight" for i in range(2) for j in (0, 2)]
    w0 = dict(source.named_parameters())
    expected = plain_l2_to(model, w0, names, 0.25)
    torch.testing.assert_close(reg.penalty().double(), expected, rtol=1e-6, atol=1e-8)
