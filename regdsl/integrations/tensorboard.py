"""Per-term values (and, when asked, weight histograms) in TensorBoard.

    from regdsl.integrations.tensorboard import log
    log(reg, writer, step)                   # reg/<term>:<line> scalars, e.g. reg/l1:6
    log(reg, writer, step, histograms=True)  # plus weights/<group> histograms, one per optimizer group

``writer`` is a ``torch.utils.tensorboard.SummaryWriter`` (``pip install regdsl[tensorboard]``), or
anything with its ``add_scalar`` and ``add_histogram``. The labels are the ones the Lightning and
Trainer integrations log.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compiler import Regularizer


def log(reg: Regularizer, writer: Any, step: int, histograms: bool = False) -> None:
    """Write each term's value now as ``reg/<term>:<line>``; with ``histograms``, each optimizer
    group's weights as one ``weights/<group name>`` histogram (frozen parameters are in no group)."""
    for label, value in reg.values().items():
        writer.add_scalar(f"reg/{label}", value.item(), step)
    if histograms:
        for name, params in group_weights(reg).items():
            writer.add_histogram(f"weights/{name}", params, step)


def group_weights(reg: Regularizer) -> dict[str, torch.Tensor]:
    """Each optimizer group's weights, flattened into one float32 CPU tensor, by group name."""
    out = {}
    # The groups param_groups() gives, read without calling it: a call records how the optimizer's
    # groups were built (lr_scale or not), which remap_optimizer_state() then follows.
    for key, members in reg._groups:
        params = [p.detach().flatten().float().cpu() for p in members.params]
        if params:
            out[key.name] = torch.cat(params)
    return out


__all__ = ["group_weights", "log"]
