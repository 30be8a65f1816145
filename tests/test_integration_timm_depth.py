"""Layer-wise lr decay against timm's own ``param_groups_layer_decay``: on a timm ViT with register
tokens and a frozen block, every trainable parameter's lr_scale from the rule file is timm's, bit
for bit; timm's function on HF-named modules, given a group_matcher, gives tests/test_depth.py's
written-out reference; and timm's scheduler keeps the scales.

Runs itself in the timm environment as tests/test_integration_timm.py does (REGDSL_TIMM_PYTHON).
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
    from test_depth import BERT_RULES, hf_layer_id, timm_scales
    from timm.optim import create_optimizer_v2, param_groups_layer_decay
    from timm.scheduler import CosineLRScheduler
    from torch import nn

    import regdsl
    from regdsl.integrations.timm import param_group_fn

    # timm's ViT group_matcher: stem (cls_token, reg_token, pos_embed, patch_embed) 0, blocks.N
    # N + 1, norm in the last block's group (its matcher's MATCH_PREV_GROUP), anything unmatched
    # (the head) after that.
    VIT_RULES = """\
layer cls_token, reg_token, pos_embed, patch_embed depth 0
layer blocks.{i} depth i + 1
layer norm depth last - 1
layer head depth last
lr_decay 0.75
"""

    def vit() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3, depth=3,
            embed_dim=24, num_heads=2, reg_tokens=2,
        )  # fmt: skip

    def timm_lr_scales(model: nn.Module, decay: float = 0.75) -> dict[int, float]:
        groups = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=decay)
        return {id(p): g["lr_scale"] for g in groups for p in g["params"]}

    def regdsl_lr_scales(model: nn.Module, rules: str) -> dict[int, float]:
        reg = regdsl.parse(rules).compile(model)
        return {id(p): g.get("lr_scale", 1.0) for g in reg.param_groups(lr_scale=True) for p in g["params"]}

    @pytest.mark.parametrize("frozen", [None, 0, 2])
    def test_vit_scales_are_param_groups_layer_decays(frozen: int | None) -> None:
        model = vit()
        if frozen is not None:
            model.blocks[frozen].requires_grad_(False)
        theirs = timm_lr_scales(model)
        assert len(theirs) == sum(p.requires_grad for p in model.parameters())
        assert regdsl_lr_scales(model, VIT_RULES) == theirs
        # reg_token is in timm's stem (the fix of timm #2712), at depth 0 of 4; norm shares block 2's.
        assert theirs[id(model.reg_token)] == 0.75**4
        assert theirs[id(model.norm.weight)] == 0.75 and theirs[id(model.head.weight)] == 1.0

    def test_the_docs_file_on_a_vit_without_register_tokens() -> None:
        # docs/integrations/timm.md's file is for timm's default ViT; VIT_RULES adds reg_token for reg_tokens=2.
        docs = VIT_RULES.replace("cls_token, reg_token,", "cls_token,")
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, num_classes=3, depth=3, embed_dim=24, num_heads=2
        )  # fmt: skip
        assert regdsl_lr_scales(model, docs) == timm_lr_scales(model)
        with pytest.raises(regdsl.RegCompileError, match="RD101 layer pattern 'reg_token'"):
            regdsl.parse(VIT_RULES).compile(model)

    def test_timm_schedulers_keep_the_scales() -> None:
        model = vit()
        scales = timm_lr_scales(model)
        groups = param_group_fn(regdsl.parse(VIT_RULES), lr_scale=True)
        opt = create_optimizer_v2(model, "sgd", lr=0.1, param_group_fn=groups)
        sched = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=1e-3)
        lrs = []
        for step in range(5):
            sched.step(step)
            # The head's factor is 1: its group has no lr_scale and gets the scheduled lr itself.
            (base,) = {g["lr"] for g in opt.param_groups if "lr_scale" not in g}
            lrs.append(base)
            for group in opt.param_groups:
                for p in group["params"]:
                    assert group["lr"] == pytest.approx(base * scales[id(p)], rel=1e-12), step
        assert len(set(lrs)) == 5  # the schedule moved at every step

    class HFNamedBert(nn.Module):
        """BertForSequenceClassification's parameter names, without transformers (not installed here)."""

        def __init__(self, layers: int = 3) -> None:
            super().__init__()
            self.bert = nn.Module()
            self.bert.embeddings = nn.Module()
            self.bert.embeddings.word_embeddings = nn.Embedding(10, 4)
            self.bert.embeddings.LayerNorm = nn.LayerNorm(4)
            self.bert.encoder = nn.Module()
            self.bert.encoder.layer = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(layers))
            self.bert.pooler = nn.Module()
            self.bert.pooler.dense = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

        def group_matcher(self, coarse: bool = False) -> dict:
            return {"embed": r"^bert\.embeddings", "blocks": [(r"^bert\.encoder\.layer\.(\d+)", None)]}

    @pytest.mark.parametrize("frozen", [None, 2])
    def test_timm_on_hf_names_is_the_reference_test_depth_writes_out(frozen: int | None) -> None:
        model = HFNamedBert()
        if frozen is not None:
            model.bert.encoder.layer[frozen].requires_grad_(False)
        names = {id(p): n for n, p in model.named_parameters()}
        reference = timm_scales(list(names.values()), hf_layer_id("bert.embeddings", "bert.encoder.layer", 3))
        theirs = timm_lr_scales(model)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert set(theirs) == trainable
        assert {names[k]: v for k, v in theirs.items()} == {names[k]: reference[names[k]] for k in trainable}
        assert regdsl_lr_scales(model, BERT_RULES) == theirs
