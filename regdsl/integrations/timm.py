"""timm with a rule file (docs/integrations/timm.md):

    groups = param_group_fn("rules.reg", lr_scale=True)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, param_group_fn=groups)
    groups.reg.attach(optimizer, fold=True)

``param_group_fn`` compiles the rules against the model timm hands it and returns regdsl's
groups; the compiled :class:`~regdsl.Regularizer` is then ``groups.reg``. For ``lr_mult``, a
group carries either ``lr_scale`` (``lr_scale=True``: timm's schedulers overwrite every group's
lr with the scheduled value times its ``lr_scale``) or its own ``lr`` (``lr=...``: torch's
schedulers scale each group's own lr), never both. :class:`RegularizedLoss` adds
``reg.penalty()`` to a criterion, for timm's train loop. Nothing here imports timm.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..compiler import Regularizer, compile
from ..errors import RegUsageError
from ..spec import Spec


class RegParamGroups:
    """The ``param_group_fn`` timm calls with the model; ``.reg`` is the regularizer it compiled."""

    def __init__(
        self,
        rules: Spec | str | os.PathLike[str],
        lr: float | None = None,
        lr_scale: bool = False,
        reference: Mapping[str, torch.Tensor] | None = None,
    ):
        if not isinstance(lr_scale, bool):
            raise RegUsageError(
                f"lr_scale is True (timm's schedulers) or False, not {lr_scale!r}: a learning rate goes in lr= "
                "(torch's schedulers) or create_optimizer_v2(lr=...)"
            )
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0):
            raise RegUsageError(f"lr is a learning rate (a number >= 0) or None, not {lr!r}")
        if lr is not None and lr_scale:
            raise RegUsageError("give lr= (torch's schedulers) or lr_scale=True (timm's schedulers), not both")
        self.rules, self.lr, self.lr_scale, self.reference = rules, lr, lr_scale, reference
        self._reg: Regularizer | None = None

    def __call__(self, model: nn.Module) -> list[dict[str, Any]]:
        self._reg = compile(self.rules, model, reference=self.reference)
        defaults = {"lr": self.lr} if self.lr is not None else {}
        return self._reg.param_groups(lr_scale=self.lr_scale, **defaults)

    @property
    def reg(self) -> Regularizer:
        if self._reg is None:
            raise RegUsageError("groups.reg exists once timm has called the param_group_fn (create_optimizer_v2)")
        return self._reg


def param_group_fn(
    rules: Spec | str | os.PathLike[str],
    lr: float | None = None,
    lr_scale: bool = False,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> RegParamGroups:
    """A ``param_group_fn`` for ``timm.optim.create_optimizer_v2``. With ``lr_mult`` in the file,
    pass ``lr_scale=True`` when a timm scheduler drives the lr, or the base ``lr`` for torch's."""
    return RegParamGroups(rules, lr=lr, lr_scale=lr_scale, reference=reference)


class RegularizedLoss(nn.Module):
    """``criterion(output, target) + reg.penalty()``: a drop-in ``train_loss_fn`` for timm's loop."""

    def __init__(self, criterion: Callable[..., torch.Tensor], reg: Regularizer | RegParamGroups):
        super().__init__()
        if not isinstance(reg, (Regularizer, RegParamGroups)):
            raise RegUsageError(
                f"RegularizedLoss(criterion, reg) takes a compiled regdsl.Regularizer or the groups param_group_fn "
                f"returned, not a {type(reg).__name__}: regdsl.compile(rules, model) first"
            )
        if not callable(criterion):
            raise RegUsageError(f"RegularizedLoss(criterion, reg) takes a loss function first, not a {type(criterion).__name__}")
        self.criterion = criterion
        self._reg = reg

    def forward(self, output: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        reg = self._reg.reg if isinstance(self._reg, RegParamGroups) else self._reg
        return self.criterion(output, target, *args, **kwargs) + reg.penalty()


__all__ = ["RegParamGroups", "RegularizedLoss", "param_group_fn"]
