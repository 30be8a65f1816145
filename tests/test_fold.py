"""attach(optimizer, fold=True): loss terms folded into the optimizer step (docs/fold.md).

Every expected value comes from a plain reference written here: the penalty as torch
formulas on the model's own parameters, differentiated by autograd, activity terms
from the test's own forward hooks, schedules as hand-written functions, and an SGD
built by hand. Nothing expected is read back from regdsl.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import CNN, MLP, TinyTransformer, seeded
from torch import nn

import regdsl

STEPS = 4
LR = 0.1

Strength = Callable[[int], float]


def const(lam: float) -> Strength:
    return lambda t: lam


def warmup(lam: float, steps: int) -> Strength:
    return lambda t: lam * min(t / steps, 1.0)


def starting(lam: float, start: int) -> Strength:
    return lambda t: lam if t >= start else 0.0


def cosine(lam: float, end: float, steps: int) -> Strength:
    return lambda t: end + (lam - end) * (1 + math.cos(math.pi * min(t, steps) / steps)) / 2


@dataclass
class Case:
    """A model, its rule file, and the same rules written out by hand for the reference."""

    build: Callable[[], nn.Module]
    rules: str
    terms: list[tuple[str, str, Strength, dict[str, Any]]]  # (parameter, kind, λ(t), options)
    loss: Callable[[nn.Module, int], torch.Tensor]  # (model, micro-batch index) -> data loss
    activity: list[tuple[str, str, Strength]] = field(default_factory=list)  # (module, kind, λ(t))
    decay: Callable[[str], float] = lambda name: 0.0


def reference_penalty(case: Case, params: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    total = torch.zeros(())
    for name, kind, lam, opts in case.terms:
        w = params[name]
        if kind == "l1":
            value = w.abs().sum()
        elif kind == "l2":
            value = 0.5 * w.square().sum()
        elif kind == "l2_init":
            value = 0.5 * (w - w0[name]).square().sum()
        elif kind == "group_lasso":
            dim = opts.get("dim", 0) % w.ndim
            others = [d for d in range(w.ndim) if d != dim]
            value = torch.linalg.vector_norm(w, 2, dim=others).sum() if others else w.abs().sum()
        else:
            m = w.reshape(w.shape[0], -1)
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            value = (gram - torch.eye(gram.shape[0])).square().sum()
        total = total + lam(t) * value
    return total


def activity_value(kind: str, out: torch.Tensor) -> torch.Tensor:
    out = out.float()
    if kind == "l1":
        return out.abs().sum() / out.shape[0]
    return 0.5 * out.square().sum() / out.shape[0]


def reference_run(
    case: Case,
    *,
    terms: str | None | tuple[str | None, str | None] = "loss",
    activity: bool | tuple[bool, bool] | frozenset[int] = True,
    steps: int = STEPS,
    micro: int = 1,
    clip: float | None = None,
    skip: frozenset[int] = frozenset(),
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Weights after each step and gradients seen by each step, by hand. ``terms``: "loss" (in the
    loss), "step" (added to .grad right before the step), None, or a pair: the first for steps
    0 and 1, the second after (``activity`` likewise, or the set of steps without it)."""
    model = case.build()
    named = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.SGD(
        [{"params": [p], "weight_decay": case.decay(n)} for n, p in named.items()], lr=LR, momentum=0.9
    )
    outputs: list[tuple[str, Strength, torch.Tensor]] = []
    modules = dict(model.named_modules())
    for module, kind, lam in case.activity:
        modules[module].register_forward_hook(lambda m, a, out, kind=kind, lam=lam: outputs.append((kind, lam, out)))
    weights, grads, t = [], [], 0
    for step in range(steps):
        where = terms if not isinstance(terms, tuple) else terms[step >= 2]
        opt.zero_grad()
        for k in range(micro):
            outputs.clear()
            loss = case.loss(model, step * micro + k)
            if (step not in activity) if isinstance(activity, frozenset) else activity[step >= 2] if isinstance(activity, tuple) else activity:
                loss = loss + sum(lam(t) * activity_value(kind, out) for kind, lam, out in outputs)
            if where == "loss":
                loss = loss + reference_penalty(case, named, w0, t)
            (loss / micro).backward()
        if step in skip:
            continue  # what GradScaler does with an inf gradient: no step, no count
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if where == "step":
            term_grads = torch.autograd.grad(
                reference_penalty(case, named, w0, t), list(named.values()), allow_unused=True
            )
            for p, g in zip(named.values(), term_grads):
                if g is not None:
                    p.grad = g.clone() if p.grad is None else p.grad + g
        grads.append({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
        opt.step()
        weights.append({n: p.detach().clone() for n, p in named.items()})
        t += 1
    return weights, grads


def regdsl_run(
    case: Case,
    mode: str,
    *,
    steps: int = STEPS,
    micro: int = 1,
    penalty_scale: float = 1.0,
    clip: float | None = None,
    scaler_inf: frozenset[int] | None = None,
    fused: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], regdsl.Regularizer]:
    """Train through regdsl. ``mode``: '<setup>[+penalty]', setup one of attach, fold, after_step,
    fold>attach, attach>fold, fold>after_step (a>b: a for the first two steps, detach, then b)."""
    model = case.build()
    reg = regdsl.parse(case.rules).compile(model)
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR, momentum=0.9, **({"fused": True} if fused else {}))
    setup, _, penalty = mode.partition("+")
    phases = setup.split(">")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler_inf is not None else None
    captured: dict[str, torch.Tensor] = {}
    opt.register_step_pre_hook(lambda o, a, k: None)  # a user's own hook must not disturb anything

    def use(phase: str) -> None:
        if phase in ("attach", "fold"):
            reg.attach(opt, fold=phase == "fold")

    use(phases[0])
    weights, grads = [], []
    for step in range(steps):
        if len(phases) > 1 and step == 2:
            reg.detach()
            use(phases[1])
        phase = phases[1] if len(phases) > 1 and step >= 2 else phases[0]
        opt.zero_grad()
        for k in range(micro):
            loss = case.loss(model, step * micro + k)
            if penalty:
                loss = loss + penalty_scale * reg.penalty()
            if scaler is not None and step in scaler_inf and k == micro - 1:
                loss = loss + float("inf") * named[next(iter(named))].sum()
            (scaler.scale(loss / micro) if scaler is not None else loss / micro).backward()
        if clip is not None:
            if scaler is not None:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        captured_step = opt.register_step_post_hook(
            lambda o, a, k: captured.update({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
        )
        captured.clear()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        captured_step.remove()
        if phase == "after_step":
            reg.after_step(opt)
        if captured:
            grads.append(dict(captured))
            weights.append({n: p.detach().clone() for n, p in named.items()})
    return weights, grads, reg


def assert_runs_equal(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]], what: str) -> None:
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), (what, step)
        for name in w:
            torch.testing.assert_close(
                g[name],
                w[name],
                rtol=2e-5,
                atol=2e-6,
                msg=lambda m, step=step, name=name: f"{what}, step {step}, {name}: {m}",
            )


def batch(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


def mlp_case() -> Case:
    def build() -> nn.Module:
        seeded(0)
        model = MLP()
        with torch.no_grad():
            model.fc2.weight[3].zero_()  # an all-zero group_lasso slice: its gradient is 0, not NaN
        return model

    return Case(
        build=build,
        rules=(
            "all decay 0.01\nexclude bias\n"
            "layer fc1.weight l1 0.02 warmup 3\n"
            "layer fc2.weight l2 0.3 to init group_lasso 0.05\n"
            "layer head.weight orthogonal 0.02 l2 0.1\n"
            "layer fc1 activity l1 0.01\n"
        ),
        terms=[
            ("fc1.weight", "l1", warmup(0.02, 3), {}),
            ("fc2.weight", "l2_init", const(0.3), {}),
            ("fc2.weight", "group_lasso", const(0.05), {}),
            ("head.weight", "orthogonal", const(0.02), {}),
            ("head.weight", "l2", const(0.1), {}),
        ],
        activity=[("fc1", "l1", const(0.01))],
        decay=lambda name: 0.0 if name.endswith("bias") else 0.01,
        loss=lambda model, i: F.mse_loss(model(batch(i, 16, 6)), batch(100 + i, 16, 3)),
    )


def cnn_case() -> Case:
    def build() -> nn.Module:
        seeded(1)
        return CNN()

    return Case(
        build=build,
        rules=(
            "type Conv2d l1 0.01\n"
            "layer conv1.bias group_lasso 0.03\n"
            "layer conv2.weight group_lasso 0.05 dim=1 orthogonal 0.01\n"
            "layer head.weight l2 0.1 cosine to 0.01 over 3\n"
            "layer bn2 activity l2 0.002\n"
        ),
        terms=[
            ("conv1.weight", "l1", const(0.01), {}),
            ("conv1.bias", "l1", const(0.01), {}),
            ("conv1.bias", "group_lasso", const(0.03), {}),
            ("conv2.weight", "l1", const(0.01), {}),
            ("conv2.weight", "group_lasso", const(0.05), {"dim": 1}),
            ("conv2.weight", "orthogonal", const(0.01), {}),
            ("head.weight", "l2", cosine(0.1, 0.01, 3), {}),
        ],
        activity=[("bn2", "l2", const(0.002))],
        loss=lambda model, i: F.cross_entropy(model(batch(i, 4, 3, 6, 6)), torch.arange(4) % 5),
    )


def transformer_case() -> Case:
    def build() -> nn.Module:
        seeded(2)
        return TinyTransformer()

    model = build()
    mlp_weights = [n for n, _ in model.named_parameters() if ".mlp." in n and n.endswith("weight")]
    norms = ("ln1", "ln2", "ln_f")
    kept = [
        n
        for n, _ in model.named_parameters()
        if not n.endswith("bias") and not set(n.split(".")) & set(norms) and n != "embed.weight"
    ]
    return Case(
        build=build,
        rules=(
            "all l2 0.01\nexclude bias\nexclude norm\n"
            "layer blocks.*.mlp.* l1 0.002 from 2\n"
            "layer embed.weight l2 0.05 to init\n"
            "layer blocks.0.attn.out_proj.weight orthogonal 0.01\n"
        ),
        terms=[(n, "l2", const(0.01), {}) for n in kept]
        + [(n, "l1", starting(0.002, 2), {}) for n in mlp_weights]
        + [
            ("embed.weight", "l2_init", const(0.05), {}),
            ("blocks.0.attn.out_proj.weight", "orthogonal", const(0.01), {}),
        ],
        loss=lambda model, i: F.cross_entropy(model(tokens(i, 50)).flatten(0, 1), tokens(100 + i, 50).flatten()),
    )


def gpt2_case() -> Case:
    pytest.importorskip("transformers")
    from models import gpt2

    def build() -> nn.Module:
        return gpt2(3).eval()  # eval: no dropout, so both runs see the same forward

    model = build()
    names = [n for n, _ in model.named_parameters()]
    kept = [n for n in names if not n.endswith("bias") and ".ln_" not in n and not n.startswith("transformer.ln_f")]
    conv1d = [n for n in names if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    return Case(
        build=build,
        rules=(
            "all l2 0.01 warmup 2\nexclude bias\nexclude norm\n"
            "type Conv1D l1 0.001\n"
            "layer transformer.h.0.mlp.c_fc.weight group_lasso 0.02 dim=1\n"
        ),
        terms=[(n, "l2", warmup(0.01, 2), {}) for n in kept]
        + [(n, "l1", const(0.001), {}) for n in conv1d]
        + [("transformer.h.0.mlp.c_fc.weight", "group_lasso", const(0.02), {"dim": 1})],
        loss=lambda model, i: F.cross_entropy(
            model(tokens(i, 100)).logits.flatten(0, 1), tokens(100 + i, 100).flatten()
        ),
    )


CASES = {"mlp": mlp_case, "cnn": cnn_case, "transformer": transformer_case, "gpt2": gpt2_case}

# mode -> (where the reference puts the parameter terms, whether it has the activity terms)
COMBINATIONS = {
    "attach+penalty": ("loss", True),
    "attach": (None, False),
    "fold+penalty": ("loss", True),
    "fold": ("loss", False),  # every parameter term folded; the activity term lives only in penalty()
    "after_step+penalty": ("loss", True),
    "after_step": (None, False),
    "fold>attach+penalty": ("loss", True),
    "fold>attach": (("loss", None), False),
    "attach>fold+penalty": ("loss", True),
    "attach>fold": ((None, "loss"), False),
    # detach() removes the activity hooks and after_step() installs them again: only step 2,
    # whose forward ran between the two, has no activity term (and penalty() warned).
    "fold>after_step+penalty": ("loss", frozenset({2})),
    "fold>fold+penalty": ("loss", True),
}


@pytest.mark.parametrize("model", list(CASES))
def test_no_combination_counts_a_term_twice(model: str) -> None:
    case = CASES[model]()
    references: dict[Any, Any] = {}
    for mode, (terms, activity) in COMBINATIONS.items():
        key = (terms, activity)
        if key not in references:
            references[key] = reference_run(case, terms=terms, activity=activity)
        want_w, want_g = references[key]
        got_w, got_g, _ = regdsl_run(case, mode)
        assert_runs_equal(got_g, want_g, f"{model} {mode}: gradients")
        assert_runs_equal(got_w, want_w, f"{model} {mode}: weights")


# ------------------------------------------------------------ where the two paths differ


def test_clipping_sees_the_folded_terms_only_on_the_loss_path() -> None:
    # clip_grad_norm_ runs before step(): on the fold path it clips the data (and activity)
    # gradient alone and the terms are added after it; on the loss path it clips their sum.
    case = mlp_case()
    fold_w, fold_g, _ = regdsl_run(case, "fold+penalty", clip=0.05)
    want_w, want_g = reference_run(case, terms="step", clip=0.05)
    assert_runs_equal(fold_g, want_g, "fold, clipped: gradients")
    assert_runs_equal(fold_w, want_w, "fold, clipped: weights")
    loss_w, _, _ = regdsl_run(case, "attach+penalty", clip=0.05)
    assert_runs_equal(loss_w, reference_run(case, terms="loss", clip=0.05)[0], "loss path, clipped")
    assert not torch.allclose(fold_w[-1]["fc2.weight"], loss_w[-1]["fc2.weight"], atol=1e-4)


@pytest.mark.parametrize("mode", ["fold+penalty", "attach+penalty"])
def test_a_step_grad_scaler_skips_skips_the_fold(mode: str) -> None:
    # Step 1 has an inf gradient: GradScaler skips optimizer.step(), so neither the fold nor the
    # step counter runs, exactly as the loss path's penalty gradient is dropped with the step.
    case = mlp_case()
    got_w, got_g, reg = regdsl_run(case, mode, steps=STEPS + 1, scaler_inf=frozenset({1}))
    want_w, want_g = reference_run(case, steps=STEPS + 1, skip=frozenset({1}))
    assert reg.step == STEPS
    assert_runs_equal(got_g, want_g, f"{mode} under GradScaler: gradients")
    assert_runs_equal(got_w, want_w, f"{mode} under GradScaler: weights")


def test_fused_optimizer_under_grad_scaler_gets_scaled_terms() -> None:
    # A fused optimizer receives the still-scaled gradients (GradScaler sets optimizer.grad_scale
    # and the kernel unscales): the folded terms are scaled to match.
    case = mlp_case()
    got_w, _, _ = regdsl_run(case, "fold+penalty", scaler_inf=frozenset(), fused=True)
    assert_runs_equal(got_w, reference_run(case)[0], "fused SGD under GradScaler")


def test_gradient_accumulation_folds_once_per_optimizer_step() -> None:
    case = mlp_case()
    want_w, want_g = reference_run(case, terms="step", micro=3)  # terms once, whatever the micro-steps
    fold_w, fold_g, _ = regdsl_run(case, "fold+penalty", micro=3)  # penalty(): the activity term, per micro-step
    assert_runs_equal(fold_g, want_g, "fold, 3 micro-steps: gradients")
    assert_runs_equal(fold_w, want_w, "fold, 3 micro-steps: weights")
    # The loss path matches only with penalty()/k per micro-step (the runner divides each loss by k) ...
    assert_runs_equal(regdsl_run(case, "attach+penalty", micro=3)[0], want_w, "loss path, penalty/k")
    # ... and the full penalty() on each micro-step counts the terms k times.
    too_strong = regdsl_run(case, "attach+penalty", micro=3, penalty_scale=3.0)[0]
    assert not torch.allclose(too_strong[-1]["fc2.weight"], want_w[-1]["fc2.weight"], atol=1e-4)


def test_detach_removes_the_fold_hook_and_penalty_is_whole_again() -> None:
    case = mlp_case()
    model = case.build()
    named = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in named.items()}
    reg = regdsl.parse(case.rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    before = len(opt._optimizer_step_pre_hooks)
    reg.attach(opt, fold=True)
    assert len(opt._optimizer_step_pre_hooks) == before + 1
    assert reg.penalty().item() == 0.0  # everything folded, no activity collected yet
    reg.detach()
    assert len(opt._optimizer_step_pre_hooks) == before
    torch.testing.assert_close(reg.penalty(), reference_penalty(case, named, w0, 0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weights = {n: p.detach().clone() for n, p in named.items()}
    opt.step()  # nothing folded any more: only the optimizer's weight_decay moves the weights
    for n, p in named.items():
        torch.testing.assert_close(p.detach(), weights[n] * (1 - LR * case.decay(n)))


# ------------------------------------------------------------ nothing per step when nothing is scheduled


def hook_counts(opt: torch.optim.Optimizer) -> tuple[int, int]:
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize(
    ("rules", "fold", "hooks", "advances"),
    [
        ("all decay 0.05\nexclude bias", False, (0, 1), False),  # a post-hook that only counts
        ("all decay 0.05\nexclude bias", True, (0, 1), False),  # nothing to fold: the same
        ("all decay 0.05 l2 0.1 l1 0.01\nexclude bias", True, (1, 0), False),  # the fold hook counts
        ("all l2 0.1\nlayer head.weight l1 0.01 warmup 2", True, (1, 1), True),  # a schedule moves
        ("all decay 0.05 warmup 2", False, (0, 1), True),
        ("layer fc1 activity l1 0.1", True, (0, 1), True),  # pending activity values are dropped
        ("layer head.weight max_norm 1", True, (0, 1), True),
    ],
)
def test_step_hooks_do_only_what_the_rules_need(
    monkeypatch: pytest.MonkeyPatch, rules: str, fold: bool, hooks: tuple[int, int], advances: bool
) -> None:
    calls: list[int] = []
    advance = regdsl.Regularizer._advance
    monkeypatch.setattr(regdsl.Regularizer, "_advance", lambda self, opt: (calls.append(1), advance(self, opt)))
    seeded(0)
    model = MLP()
    reg = regdsl.parse(rules).compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    reg.attach(opt, fold=fold)
    assert hook_counts(opt) == hooks
    x = torch.randn(4, 6)
    for _ in range(3):
        opt.zero_grad()
        (model(x).square().mean() + reg.penalty()).backward()
        opt.step()
    assert reg.step == 3  # reg.step and state_dict() stay right without the bookkeeping
    assert len(calls) == (3 if advances else 0)
    reg.detach()
    assert hook_counts(opt) == (0, 0)


def test_after_step_stays_correct_with_constant_decay() -> None:
    seeded(0)
    model = MLP()
    reg = regdsl.parse("all decay 0.05\nexclude bias").compile(model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR), lr=LR)
    for _ in range(2):
        reg.after_step(opt)
        reg.after_step()  # no optimizer needed: nothing scheduled, nothing after the step
    assert reg.step == 4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert hook_counts(opt) == (0, 0)


def test_the_zero_penalty_of_a_folded_file_is_never_one_a_caller_changed() -> None:
    # With everything folded, penalty() hands out one zero while nobody changes it (a new one each step
    # cost a fifth of the fold path's overhead on a tiny model); a caller's in-place add or
    # requires_grad_() must not reach the next call.
    model = nn.Sequential(nn.Linear(3, 2))
    reg = regdsl.parse("all l2 0.1\n").compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt, fold=True)
    first = reg.penalty()
    assert first.item() == 0.0 and not first.requires_grad
    first += 5.0  # total = reg.penalty(); total += aux
    second = reg.penalty()
    assert second.item() == 0.0 and first.item() == 5.0
    second.requires_grad_()
    third = reg.penalty()
    assert third.item() == 0.0 and not third.requires_grad
    assert reg.penalty() is third  # unchanged: kept
