"""What the step benchmarks share (step_overhead.py, term_work.py): the five models, the two rule
files, the tutorial's loop they are measured against, and the command line.

Models: a tiny MLP 10-5-1 (batch 32), a 400-layer MLP (64 wide, ReLU, batch 256), ResNet-50 (batch 4,
224x224) and ViT-B/16 (batch 1) from transformers' default configs with random weights (nothing is
downloaded), and a 2-layer GPT-2 LM (64 wide, vocabulary 1000, batch 8 x 64 tokens). --quick builds
ResNet and ViT at toy sizes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import regdsl

LR = 1e-3
L1, L2, GROUP = 1e-5, 1e-4, 1e-4
EXCLUDES = "exclude bias\nexclude norm\n"
WORKLOADS = {
    "elastic net": f"all l1 {L1:g} l2 {L2:g}\n" + EXCLUDES,
    "group_lasso": f"all group_lasso {GROUP:g}\n" + EXCLUDES,
}

# ---------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Bench:
    key: str
    title: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.loss_fn(model, self.inputs)

    def cast(self, dtype: torch.dtype) -> Bench:
        """A copy of the model and the inputs in ``dtype`` (integer inputs, token ids, stay)."""
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.inputs.items()}
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(dtype), inputs=inputs)


def _mse(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(inputs["x"]), inputs["y"])


def _cross_entropy(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs["x"]), inputs["y"])


def _hf_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).loss


def tiny_mlp(quick: bool) -> tuple[str, nn.Module, dict[str, torch.Tensor], Any]:
    model = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 1))
    return "tiny MLP 10-5-1, batch 32", model, {"x": torch.randn(32, 10), "y": torch.randn(32, 1)}, _mse


def mlp400(quick: bool) -> tuple[str, nn.Module, dict[str, torch.Tensor], Any]:
    layers: list[nn.Module] = []
    for _ in range(399):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    # He initialization keeps the activations of 400 ReLU layers in range; torch's default init
    # would shrink them to denormals, which CPUs compute slowly, and the step would time those.
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    inputs = {"x": torch.randn(256, 64), "y": torch.randint(10, (256,))}
    return "400-layer MLP, 64 wide, ReLU, batch 256", model, inputs, _cross_entropy


def resnet50(quick: bool) -> tuple[str, nn.Module, dict[str, torch.Tensor], Any]:
    from transformers import ResNetConfig, ResNetForImageClassification

    if quick:
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
        title, size = "ResNet at --quick size (4 stages of 1 block, 16-128 wide), batch 4, 64x64", 64
    else:
        config = ResNetConfig()
        title, size = "ResNet-50 (ResNetConfig()), batch 4, 224x224", 224
    model = ResNetForImageClassification(config)
    inputs = {"pixel_values": torch.randn(4, 3, size, size), "labels": torch.randint(config.num_labels, (4,))}
    return title, model, inputs, _hf_loss


def vit_b16(quick: bool) -> tuple[str, nn.Module, dict[str, torch.Tensor], Any]:
    from transformers import ViTConfig, ViTForImageClassification

    if quick:
        config = ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=64
        )
        title = "ViT at --quick size (2 layers, 64 wide, patch 16), batch 1, 64x64"
    else:
        config = ViTConfig()
        title = "ViT-B/16 (ViTConfig()), batch 1, 224x224"
    model = ViTForImageClassification(config)
    size = config.image_size
    inputs = {"pixel_values": torch.randn(1, 3, size, size), "labels": torch.randint(config.num_labels, (1,))}
    return title, model, inputs, _hf_loss


def gpt2_tiny(quick: bool) -> tuple[str, nn.Module, dict[str, torch.Tensor], Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(config.vocab_size, (8, 64))
    return (
        "GPT-2 LM, 2 layers, 64 wide, vocabulary 1000 (tied), batch 8 x 64 tokens",
        model,
        {"input_ids": ids, "labels": ids},
        _hf_loss,
    )


MODELS = {"tiny_mlp": tiny_mlp, "mlp400": mlp400, "resnet50": resnet50, "vit_b16": vit_b16, "gpt2_tiny": gpt2_tiny}
# Issue 9's targets, as multiples of the tutorial loop's overhead: step_overhead.py applies them to a
# step's overhead, term_work.py to the work alone.
TARGETS = {"fast path": (0.25, set(MODELS)), "compiled path": (0.10, {"mlp400", "resnet50", "vit_b16"})}


def build_bench(key: str, quick: bool, device: torch.device) -> Bench:
    torch.manual_seed(0)
    title, model, inputs, loss_fn = MODELS[key](quick)
    model.to(device).train()
    return Bench(key, title, model, {k: v.to(device) for k, v in inputs.items()}, loss_fn)


def compile_rules(rules: str, model: nn.Module) -> Any:
    # The workload is one file for every model, so an `exclude norm` on a model without normalization
    # layers draws a RegDslWarning (an exclude that matches nothing); that is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regdsl.RegDslWarning)
        return regdsl.parse(rules).compile(model)


def regularized(reg: Any) -> list[str]:
    """The names of the tensors the rule file puts a loss term on, as ``reg.explain()`` lists them."""
    return [row.name for row in reg.explain() if row.trainable and row.excluded_by is None and row.terms]


def params_by_name(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return [params[n] for n in names]


def tutorial_penalty(workload: str, params: list[nn.Parameter]) -> Callable[[], Any]:
    """What a tutorial writes: a Python loop over the parameters, summed into the loss."""
    if workload == "elastic net":

        def penalty() -> Any:
            total = 0.0
            for p in params:
                total = total + L1 * p.abs().sum() + L2 / 2 * p.pow(2).sum()
            return total

    else:  # group_lasso over dim 0 (output units, filters); a 1-D tensor's elements are each a group

        def penalty() -> Any:
            total = 0.0
            for p in params:
                total = total + GROUP * (p.reshape(p.shape[0], -1).norm(dim=1).sum() if p.ndim > 1 else p.abs().sum())
            return total

    return penalty


def verdict(err: float, tolerance: float) -> str:
    """A check's line for one candidate: its error, then 'ok', or 'FAILED' (which keeps it untimed)."""
    return f"{err:.1e} " + ("ok" if err <= tolerance else "FAILED")


def command_line(doc: str) -> tuple[argparse.Namespace, list[str], torch.device]:
    """The options this script and term_work.py share, parsed and applied: (args, model keys, device)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, toy-size ResNet and ViT, no torch.compile")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(map(repr, WORKLOADS))}"
    )
    parser.add_argument("--no-compile", action="store_true", help="full sizes, the compiled candidates left out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    strange = [w for w in args.workloads if w not in WORKLOADS]
    if strange:
        parser.error(f"unknown workload(s) {', '.join(strange)}; choose from {', '.join(WORKLOADS)}")
    args.compile = not (args.quick or args.no_compile)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch._logging.set_logs(dynamo=logging.ERROR)  # "Profiler record function ... will be ignored" in opt.step
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    return args, keys, device
