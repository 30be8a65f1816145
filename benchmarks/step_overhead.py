"""What does regularization add to a training step? Side by side, in interleaved rounds, in one run.

    python benchmarks/step_overhead.py [--models tiny_mlp,mlp400,resnet50,vit_b16,gpt2_tiny]
                                       [--repeats 15] [--quick] [--device cpu|cuda] [--threads N]

Models: a tiny MLP 10-5-1 (batch 32), a 400-layer MLP (64 wide, ReLU, batch 256), ResNet-50 (batch 4,
224x224) and ViT-B/16 (batch 1) from transformers' default configs with random weights (nothing is
downloaded), and a 2-layer GPT-2 LM (64 wide, vocabulary 1000, batch 8 x 64 tokens).

Workloads, on every weight, biases and normalization layers excluded:
  elastic net   all l1 1e-5 l2 1e-4      group_lasso   all group_lasso 1e-4
(plus `exclude bias` and `exclude norm`; embeddings are weights here and are regularized). The
hand-written candidates regularize exactly the tensors `reg.explain()` lists for the rule file.

Candidates, each a full training step (zero_grad, forward, backward, `torch.optim.SGD.step`):
  plain          no regularization
  tutorial loop  a per-parameter Python loop added to the loss, through autograd
  loss path      `loss + reg.penalty()`, with `reg.attach(opt)` as the README shows
  fast path      `reg.attach(opt, fold=True)`: the terms' gradients folded into the step
                 (`loss + reg.penalty()` stays, as docs/fold.md shows; it holds nothing here)
  plain, compiled  the plain step with `opt.step = torch.compile(opt.step)`: the next one's baseline
  compiled path  the fast path with `opt.step = reg.compiled_step(opt)`: the terms inside the update's
                 compiled graph (docs/fold.md), measured against the compiled plain step; what
                 dynamo made of them (graphs, breaks) is printed
  floor          not a step: one read of the regularized weights (`torch._foreach_norm`), timed alone
The table gives each step's median time, its overhead over the plain step (the median, over rounds,
of the difference within each round), that overhead as a multiple of the tutorial loop's overhead
(targets of issue 9: fast path <= 1/4 on every model, compiled path <= 1/10 on the 400-layer MLP,
ResNet-50 and ViT-B), how far noise moves that multiple (its range over 90% of 2000 resamplings
of the rounds: a target inside that range is marked "within noise") and the overhead as a multiple
of the floor.
A compiled candidate's first step compiles; its time is printed, and the compiled path compiles
twice (once more for the check below). On a busy machine, --threads 1 (see benchmarks/timing.py).

Before timing, one SGD step from the same start is taken by every candidate on a float64 copy of
the model, and the updated weights are compared with the tutorial loop's: a candidate that does not
compute the same update is reported and not timed (and the script exits 1). float64, because in
float32 the rounding of the new weights is of the order of the regularization's own update.

Hygiene: the fast and compiled paths train their own copies of the model (their hooks must not
reach the other candidates); garbage is collected before the rounds and the collector is paused
while they run, so no collection lands in a timed region; times are medians of interleaved rounds
(benchmarks/timing.py); compare only ratios within one run.
--quick: 5 rounds, ResNet-50 and ViT-B/16 at toy sizes, no torch.compile; under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import inspect
import logging
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from timing import machine, paired_overhead, ratio_interval, timed_samples
from torch import nn

import regdsl

LR = 1e-3
L1, L2, GROUP = 1e-5, 1e-4, 1e-4
EXCLUDES = "exclude bias\nexclude norm\n"
WORKLOADS = {
    "elastic net": f"all l1 {L1:g} l2 {L2:g}\n" + EXCLUDES,
    "group_lasso": f"all group_lasso {GROUP:g}\n" + EXCLUDES,
}
# Issue 9's targets: overhead as a fraction of the tutorial loop's overhead.
TARGETS = {
    "fast path": (0.25, {"tiny_mlp", "mlp400", "resnet50", "vit_b16", "gpt2_tiny"}),
    "compiled path": (0.10, {"mlp400", "resnet50", "vit_b16"}),
}
CHECK_TOLERANCE = 1e-6


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


def build_bench(key: str, quick: bool, device: torch.device) -> Bench:
    torch.manual_seed(0)
    title, model, inputs, loss_fn = MODELS[key](quick)
    model.to(device).train()
    return Bench(key, title, model, {k: v.to(device) for k, v in inputs.items()}, loss_fn)


# ------------------------------------------------------------------------------------ candidates


class Unavailable(Exception):
    """This regdsl has no such path (yet), or it was not asked for; printed as n/a."""


@dataclasses.dataclass
class Candidate:
    label: str
    model: nn.Module
    step: Callable[[], None]
    regs: list[Any] = dataclasses.field(default_factory=list)

    def close(self) -> None:
        for reg in self.regs:
            reg.detach()


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


def make_step(
    bench: Bench,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    penalty: Callable[[], Any] | None = None,
    update: Callable[[], Any] | None = None,
):
    """zero_grad, forward (+ penalty), backward, then ``update`` (default ``opt.step``)."""
    update = update or opt.step

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = bench.loss(model)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        update()

    return step


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


def has_fold() -> bool:
    return "fold" in inspect.signature(regdsl.Regularizer.attach).parameters


def plain(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    opt = torch.optim.SGD(bench.model.parameters(), lr=LR)
    return Candidate("plain step", bench.model, make_step(bench, bench.model, opt))


def tutorial_loop(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    opt = torch.optim.SGD(bench.model.parameters(), lr=LR)
    penalty = tutorial_penalty(workload, params_by_name(bench.model, names))
    return Candidate("tutorial loop", bench.model, make_step(bench, bench.model, opt, penalty))


def loss_path(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    reg = compile_rules(rules, bench.model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt)
    return Candidate("loss path", bench.model, make_step(bench, bench.model, opt, reg.penalty), [reg])


def fast_path(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    if not has_fold():
        raise Unavailable("this regdsl's attach() has no fold=")
    model = copy.deepcopy(bench.model)
    reg = compile_rules(rules, model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt, fold=True)
    # penalty() returns what was not folded (nothing here): the step a user of the fast path writes.
    return Candidate("fast path", model, make_step(bench, model, opt, reg.penalty), [reg])


def plain_compiled(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    """The compiled path's baseline: the plain step with the same ``torch.compile``d ``opt.step``."""
    if not has_fold():
        raise Unavailable("no compiled path to compare with")
    opt = torch.optim.SGD(bench.model.parameters(), lr=LR)
    return Candidate("plain, compiled", bench.model, make_step(bench, bench.model, opt, update=torch.compile(opt.step)))


def compiled_path(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    """The fast path in a compiled optimizer step: ``reg.compiled_step(opt)`` traces the folded terms
    into SGD's update graph (docs/fold.md). A regdsl without it: ``torch.compile(opt.step)``, which
    traces the fold's pre-hook as a graph of its own."""
    if not has_fold():
        raise Unavailable("this regdsl's attach() has no fold=")
    model = copy.deepcopy(bench.model)
    reg = compile_rules(rules, model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt, fold=True)
    update = reg.compiled_step(opt) if hasattr(reg, "compiled_step") else torch.compile(opt.step)
    step = make_step(bench, model, opt, reg.penalty, update=update)
    return Candidate("compiled path", model, step, [reg])


CANDIDATES = {
    "plain step": plain,
    "tutorial loop": tutorial_loop,
    "loss path": loss_path,
    "fast path": fast_path,
    "plain, compiled": plain_compiled,
    "compiled path": compiled_path,
}
# What each candidate's overhead is measured against; the rest against the plain step.
BASELINE = {"compiled path": "plain, compiled"}
REFERENCES = ("plain step", "plain, compiled")  # not regularized: no check, no ratios
COMPILED = ("plain, compiled", "compiled path")


# -------------------------------------------------------------------------------------- the check


def check(bench: Bench, rules: str, workload: str, names: list[str], labels: list[str]) -> dict[str, str]:
    """One SGD step from the same start by each candidate, on a float64 copy of the model.

    Returns, for each label but the plain step and the loop, ``max|Δw − Δw(loop)|`` over every
    trainable element divided by ``max|Δw(loop) − Δw(plain)|`` (the regularization's own update),
    formatted, or why it could not run; 'FAILED' marks a candidate above CHECK_TOLERANCE.
    """
    start = {k: v.detach() for k, v in bench.model.state_dict().items()}  # the float32 model is not stepped here
    b64 = bench.cast(torch.float64)
    trainable = [n for n, p in b64.model.named_parameters() if p.requires_grad]

    def one_step(label: str, against: dict[str, torch.Tensor] | None = None) -> Any:
        """The candidate's Δw after one step from ``start``, or with ``against``: max|Δw − against|."""
        cand = CANDIDATES[label](b64, rules, workload, names)
        try:
            cand.model.load_state_dict(start)
            torch.manual_seed(1)  # dropout (GPT-2) draws the same masks for every candidate
            cand.step()
            params = dict(cand.model.named_parameters(remove_duplicate=False))
            delta = {n: params[n].detach() - start[n].to(torch.float64) for n in trainable}
            if against is None:
                return delta
            return max((delta.pop(n) - against[n]).abs().max().item() for n in trainable)
        finally:
            cand.close()

    reference = one_step("plain step")
    loop = one_step("tutorial loop")
    own = max((loop[n] - reference[n]).abs().max().item() for n in trainable)
    del reference
    if own == 0:
        raise RuntimeError("the check is vacuous: the tutorial loop's step equals the plain step")
    results = {}
    for label in labels:
        if label in REFERENCES or label == "tutorial loop":
            continue
        try:
            err = one_step(label, loop) / own
        except Unavailable as e:
            results[label] = f"n/a ({e})"
            continue
        results[label] = verdict(err, CHECK_TOLERANCE)
    return results


def verdict(err: float, tolerance: float) -> str:
    """A check's line for one candidate: its error, then 'ok', or 'FAILED' (which keeps it untimed)."""
    return f"{err:.1e} " + ("ok" if err <= tolerance else "FAILED")


# ----------------------------------------------------------------------------------------- timing


def run_workload(
    bench: Bench, workload: str, args: argparse.Namespace, device: torch.device
) -> tuple[bool, dict[str, Any]]:
    rules = WORKLOADS[workload]
    names = regularized(compile_rules(rules, bench.model))
    params = params_by_name(bench.model, names)
    print(f"\n-- {workload}: " + " / ".join(rules.strip().splitlines()))
    print(
        f"   regularized: {len(names)} tensors, {sum(p.numel() for p in params):,} elements (the loop and the floor read these)"
    )

    labels = list(CANDIDATES)
    skip: dict[str, str] = {}
    if args.quick:
        skip.update({lb: "n/a (--quick: no torch.compile)" for lb in COMPILED})
    else:
        torch._dynamo.reset()  # every compiled opt.step shares SGD.step's code: keep its recompile count low
    checked = check(bench, rules, workload, names, [lb for lb in labels if lb not in skip])
    gc.collect()  # the float64 copies
    print(
        "   check, one SGD step from the same start on a float64 copy, max|Δw − Δw(loop)| / max|Δw(loop) − Δw(plain)|: "
        + ", ".join(f"{lb} {text}" for lb, text in checked.items())
    )
    failed = [lb for lb, text in checked.items() if "FAILED" in text]
    for lb, text in checked.items():
        if text.startswith("n/a"):
            skip[lb] = text
        elif "FAILED" in text:
            skip[lb] = "not timed: FAILED the check"

    if "compiled path" not in skip:
        torch._dynamo.reset()  # compile the timed candidates afresh, and count their graphs, not the check's
        torch._dynamo.utils.counters.clear()
    cands = []
    first: dict[str, float] = {}  # the compiled candidates' first step, which compiles
    for lb in labels:
        if lb in skip:
            continue
        try:
            cands.append(CANDIDATES[lb](bench, rules, workload, names))
        except Unavailable as e:
            skip[lb] = f"n/a ({e})"
            continue
        if lb in COMPILED:
            began = time.perf_counter()
            cands[-1].step()
            first[lb] = time.perf_counter() - began

    @torch.no_grad()
    def floor() -> None:
        torch._foreach_norm(params)

    warmup = 1 if args.quick else 3
    rounds = timed_samples([c.step for c in cands] + [floor], device, args.repeats, collect=True, warmup=warmup)
    if first:
        # What dynamo made of the compiled steps: graphs, and why it broke them (first line of each reason).
        # The plain compiled step breaks where SGD.step begins; the compiled path's graph does not.
        counters = torch._dynamo.utils.counters
        breaks = {**counters.get("graph_break", {}), **counters.get("unimplemented", {})}
        reasons = "; ".join(f"{str(k).splitlines()[0]} x{v}" for k, v in breaks.items())
        skipped = sorted(
            {
                re.sub(r"\(\S*/", "(", m.split("frame skipped: ", 1)[1].strip())
                for k in breaks
                for m in str(k).splitlines()
                if "frame skipped: " in m
            }
        )
        print(
            f"   (compiled: {counters['stats']['unique_graphs']} graphs; graph breaks: {reasons or 'none'}"
            + (f"; frames left eager: {', '.join(skipped)}" if skipped else "")
            + ")"
        )
    garbage = gc.collect()  # what piled up while the collector was paused: none, for these models
    if garbage:
        print(f"   ({garbage} objects of cyclic garbage piled up during the rounds)")
    for c in cands:
        c.close()
    samples = dict(zip([c.label for c in cands], rounds[:-1]))
    measured = {lb: statistics.median(v) for lb, v in samples.items()}
    t_floor = statistics.median(rounds[-1])
    del cands
    gc.collect()

    t_plain = measured["plain step"]
    loop_over = paired_overhead(samples["tutorial loop"], samples["plain step"])
    print(f"   {'candidate':<15}  {'ms/step':>9}  {'overhead':>8}  {'÷ loop':>6}  {'noise (90%)':>14}  {'÷ floor':>7}  notes")
    summary: dict[str, Any] = {"plain ms": t_plain * 1e3, "floor ms": t_floor * 1e3}
    for lb in labels:
        if lb in skip:
            print(f"   {lb:<15}  {skip[lb]}")
            summary[lb] = None
            continue
        t = measured[lb]
        if lb == "plain step":
            print(f"   {lb:<15}  {t * 1e3:9.3f}  {'-':>8}  {'-':>6}  {'-':>14}  {'-':>7}")
            continue
        if lb in REFERENCES:  # the compiled plain step: what compiling opt.step alone does
            print(
                f"   {lb:<15}  {t * 1e3:9.3f}  {t / t_plain - 1:+8.1%}  {'-':>6}  {'-':>14}  {'-':>7}  the compiled path's baseline; "
                f"first step (compiles) {first[lb]:.1f} s"
            )
            continue
        base = BASELINE.get(lb, "plain step")
        over = paired_overhead(samples[lb], samples[base])
        vs_loop = over / loop_over if loop_over > 0 else float("nan")
        low, high = ratio_interval(samples[lb], samples[base], samples["tutorial loop"], samples["plain step"])
        notes = [f"over the {base}"] if base != "plain step" else []
        if lb in first:
            notes.append(f"first step (compiles) {first[lb]:.1f} s")
        if lb in TARGETS and bench.key in TARGETS[lb][1] and not args.quick:
            bound = TARGETS[lb][0]
            if loop_over > 0:
                verdict = "met" if vs_loop <= bound else "MISSED"
                if low <= bound < high:
                    verdict += ", within noise"
                notes.append(f"target <= {bound:.2f}: {verdict} ({vs_loop:.3f})")
            else:
                notes.append(f"target <= {bound:.2f}: not measured (the loop measured no overhead)")
        line = (
            f"   {lb:<15}  {t * 1e3:9.3f}  {over / measured[base]:+8.1%}  {vs_loop:6.2f}  {low:5.2f} to {high:5.2f}"
            f"  {over / t_floor:6.1f}x  "
        )
        print((line + "; ".join(notes)).rstrip())
        summary[lb] = (over / measured[base], vs_loop, low, high)
    print(
        f"   {'floor (alone)':<15}  {t_floor * 1e3:9.3f}  {t_floor / t_plain:8.1%} of a plain step: one read of the regularized weights"
    )
    if loop_over <= 0:
        print(
            "   (the tutorial loop measured no overhead in this run: the ÷ loop column is meaningless; rerun on a quieter machine)"
        )
    return not failed, summary


def command_line(doc: str) -> tuple[argparse.Namespace, list[str], torch.device]:
    """The options this script and term_work.py share, parsed and applied: (args, model keys, device)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 15, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, toy-size ResNet and ViT, no torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
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


def main() -> int:
    args, keys, device = command_line(__doc__)

    print(machine(device))
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if torch.get_num_threads() > 1 and torch.get_num_threads() + load > cores + 0.5:
            print(
                f"note: other work is running (load {load:.2f} on {cores} cores) and torch uses "
                f"{torch.get_num_threads()} threads: a step may wait on a descheduled thread (--threads 1 avoids it)"
            )
    print(
        f"regdsl fast path (attach(fold=True)): {'yes' if has_fold() else 'no'}; SGD lr {LR:g}; "
        f"medians of {args.repeats} interleaved rounds{'; --quick' if args.quick else ''}"
    )
    began = time.perf_counter()
    ok = True
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for key in keys:
        bench = build_bench(key, args.quick, device)
        total = sum(p.numel() for p in bench.model.parameters())
        print(f"\n== {key}: {bench.title}; {len(list(bench.model.parameters()))} tensors, {total:,} elements")
        for workload in WORKLOADS:
            passed, summary = run_workload(bench, workload, args, device)
            ok &= passed
            rows.append((key + (" (--quick size)" if "--quick size" in bench.title else ""), workload, summary))
        del bench
        gc.collect()

    print(
        "\nSummary: overhead over the plain step (that overhead ÷ the tutorial loop's; the range of that ratio "
        "over 90% of resampled rounds); the compiled path's over the plain step with the same compiled opt.step"
    )
    cols = [lb for lb in CANDIDATES if lb not in REFERENCES]
    print("| model | workload | plain step | " + " | ".join(cols) + " | floor |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for key, workload, s in rows:
        cells = []
        for lb in cols:
            v = s.get(lb)
            cells.append("n/a" if v is None else f"{v[0]:+.1%} ({v[1]:.2f}; {v[2]:.2f} to {v[3]:.2f})")
        print(f"| {key} | {workload} | {s['plain ms']:.2f} ms | " + " | ".join(cells) + f" | {s['floor ms']:.3f} ms |")
    print(f"\n({time.perf_counter() - began:.0f} s)")
    if not ok:
        print("\nSome candidate FAILED the correctness check and was not timed.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
