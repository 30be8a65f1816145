"""regdsl.integrations.timm on a real timm ViT: create_optimizer_v2 takes regdsl's groups, timm's
scheduler keeps each lr_mult through lr_scale (and torch's through per-group lr), and a short
training run through timm's optimizer factory, scheduler and RegularizedLoss gives the weights of
a plain loop written here.

timm needs a torchvision that imports, and PyPI's does not beside torch's CPU build, which the
main test environment uses (Lightning would import it too). So `.ci/run` builds a second
environment (torch 2.14.1 with its torchvision 0.29.1, timm) and names its interpreter in
REGDSL_TIMM_PYTHON; run from any other environment, this file runs itself there. Only where
neither exists is it skipped, saying how to make one (README, "Quick start").
"""

from __future__ import annotations

import pytest

try:
    import timm
except ImportError:  # torchvision missing or broken beside this torch
    timm = None

if timm is None:
    from support import NO_TIMM, TIMM_PYTHON, run_in_timm_environment

    @pytest.mark.skipif(not TIMM_PYTHON, reason=NO_TIMM)
    def test_in_the_timm_environment() -> None:
        run_in_timm_environment(__file__)

else:
    import torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    import regdsl
    from regdsl.integrations.timm import RegularizedLoss, param_group_fn

    RULES = """\
all decay 0.05
exclude bias
exclude norm
exclude layer cls_token
exclude layer pos_embed
layer blocks.*.mlp.fc1.weight l1 1e-3
layer head.** lr_mult 0.1
"""

    def vit() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3, depth=2,
            embed_dim=24, num_heads=2, drop_rate=0.0, attn_drop_rate=0.0,
        )  # fmt: skip

    def test_create_optimizer_v2_takes_the_groups() -> None:
        model = vit()
        groups = param_group_fn(regdsl.parse(RULES), lr_scale=True)
        opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=0.9, param_group_fn=groups)
        by_name = {g["name"]: g for g in opt.param_groups}
        expected = {g["name"]: g for g in groups.reg.param_groups(lr_scale=True)}
        assert by_name.keys() == expected.keys()
        for name, group in by_name.items():
            assert group["weight_decay"] == expected[name]["weight_decay"]  # the file's, not timm's 0.9
            assert [id(p) for p in group["params"]] == [id(p) for p in expected[name]["params"]]
            assert group["lr"] == 0.1 and ("lr_scale" in group) == ("lr_mult" in group)  # lr_scale, never a scaled lr
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}

    def test_timm_schedulers_keep_lr_mult_through_lr_scale() -> None:
        model = vit()
        groups = param_group_fn(regdsl.parse(RULES), lr_scale=True)
        opt = create_optimizer_v2(model, "sgd", lr=0.1, param_group_fn=groups)
        sched = CosineLRScheduler(opt, t_initial=10, warmup_t=3, warmup_lr_init=1e-3)
        for step in range(6):
            sched.step(step)
            base = [g["lr"] for g in opt.param_groups if "lr_scale" not in g]
            head = [g["lr"] for g in opt.param_groups if "lr_scale" in g]
            assert len(set(base)) == 1 and head
            assert all(h == pytest.approx(0.1 * base[0]) for h in head), (step, base, head)

    def test_torch_schedulers_keep_lr_mult_through_group_lr() -> None:
        model = vit()
        groups = param_group_fn(regdsl.parse(RULES), lr=0.1)
        opt = create_optimizer_v2(model, "sgd", lr=0.1, param_group_fn=groups)
        assert not any("lr_scale" in g for g in opt.param_groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        for _ in range(4):
            opt.step()
            sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        heads = [n for n in lrs if "lr_mult=0.1" in n]
        others = [n for n in lrs if n not in heads]
        assert heads and all(lrs[h] == pytest.approx(0.1 * lrs[others[0]]) for h in heads)

    @pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])  # loss: the term comes through RegularizedLoss
    def test_training_through_timm_matches_a_plain_loop(fold: bool) -> None:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4, 8, 3, 16, 16, generator=g), torch.randint(0, 3, (4, 8), generator=g)
        lrs = []

        # Through timm: its optimizer factory, its scheduler (lr_scale), the wrapped criterion, the fold.
        model = vit()
        groups = param_group_fn(regdsl.parse(RULES), lr_scale=True)
        opt = create_optimizer_v2(model, "momentum", lr=0.1, momentum=0.9, param_group_fn=groups)  # "sgd" is Nesterov in timm
        sched = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=0.01)
        groups.reg.attach(opt, fold=fold)
        loss_fn = RegularizedLoss(torch.nn.CrossEntropyLoss(), groups)
        for step in range(4):
            sched.step(step)
            lrs.append(next(g["lr"] for g in opt.param_groups if "lr_scale" not in g))
            loss = loss_fn(model(x[step]), y[step])
            opt.zero_grad()
            loss.backward()
            opt.step()
        through_timm = dict(model.named_parameters())

        # By hand: torch's SGD on hand-made groups, the l1 term by its formula, the lrs timm produced.
        plain = vit()
        decayed, free, head_decayed, head_free = [], [], [], []
        for name, p in plain.named_parameters():
            excluded = name.endswith("bias") or ".norm" in name or name.startswith("norm.") or name in ("cls_token", "pos_embed")
            head = name.startswith("head.")
            (head_free if head and excluded else head_decayed if head else free if excluded else decayed).append(p)
        hand = torch.optim.SGD(
            [{"params": decayed, "weight_decay": 0.05, "scale": 1.0}, {"params": free, "weight_decay": 0.0, "scale": 1.0},
             {"params": head_decayed, "weight_decay": 0.05, "scale": 0.1}, {"params": head_free, "weight_decay": 0.0, "scale": 0.1}],
            lr=0.1, momentum=0.9,
        )  # fmt: skip
        fc1 = [p for n, p in plain.named_parameters() if n.endswith("mlp.fc1.weight")]
        for step in range(4):
            for group in hand.param_groups:
                group["lr"] = lrs[step] * group["scale"]
            loss = F.cross_entropy(plain(x[step]), y[step]) + 1e-3 * sum(w.abs().sum() for w in fc1)
            hand.zero_grad()
            loss.backward()
            hand.step()
        for name, p in plain.named_parameters():
            torch.testing.assert_close(through_timm[name], p, rtol=0, atol=1e-5, msg=name)

    def test_misuse_is_a_clear_error() -> None:
        # Before, a path was taken and failed at the first forward (AttributeError on a str), and
        # lr_scale=0.1 was read as True.
        with pytest.raises(regdsl.RegUsageError, match=r"takes a compiled regdsl.Regularizer.*not a str"):
            RegularizedLoss(F.cross_entropy, "rules.reg")
        with pytest.raises(regdsl.RegUsageError, match="takes a loss function first"):
            RegularizedLoss("cross_entropy", regdsl.parse(RULES).compile(vit()))
        with pytest.raises(regdsl.RegUsageError, match=r"lr_scale is True .* not 0.1"):
            param_group_fn(regdsl.parse(RULES), lr_scale=0.1)
        with pytest.raises(regdsl.RegUsageError, match="lr is a learning rate"):
            param_group_fn(regdsl.parse(RULES), lr="1e-3")
