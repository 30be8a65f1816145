"""step_overhead.py's candidates, each a full training step (zero_grad, forward, backward, an SGD
update) on a model of its own or the bench's, and the check every candidate passes before it is timed:
one SGD step from the same start on a float64 copy, whose new weights must equal the tutorial loop's.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from workloads import LR, Bench, compile_rules, params_by_name, tutorial_penalty, verdict

import regdsl

CHECK_TOLERANCE = 1e-6


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


def _folded(bench: Bench, rules: str) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    """A copy of the model (the fold's hooks must not reach the other candidates), its
    regularizer and an SGD with the fast path attached."""
    if not has_fold():
        raise Unavailable("this regdsl's attach() has no fold=")
    model = copy.deepcopy(bench.model)
    reg = compile_rules(rules, model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt, fold=True)
    return model, reg, opt


def fast_path(bench: Bench, rules: str, workload: str, names: list[str]) -> Candidate:
    model, reg, opt = _folded(bench, rules)
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
    model, reg, opt = _folded(bench, rules)
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
