"""Hugging Face Accelerate: ``register_for_checkpointing(accelerator, reg)`` (docs/integrations/accelerate.md).

``accelerator.register_for_checkpointing(reg)`` alone would carry the regularizer's state too, but
Accelerate loads registered objects after the optimizers: a rule file edited since the checkpoint
was refused (``RegStateError``) only once the optimizer held the checkpoint's groups and moments.
Here regdsl's state is its own file, ``regdsl.pt`` (as the Trainer integration's), written and read
by Accelerate's state hooks, which run before anything else is saved or loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..compiler import Regularizer
from ..errors import RegStateError, RegUsageError

STATE_FILE = "regdsl.pt"


def register_for_checkpointing(accelerator: Any, reg: Regularizer) -> None:
    """``accelerator.save_state()`` saves ``reg.state_dict()`` as ``regdsl.pt`` beside the rest, and
    ``accelerator.load_state()`` loads it first, on every process: schedules continue from the saved
    step, and a rule file that now groups the parameters differently is refused before the optimizer's
    state is touched."""
    if not isinstance(reg, Regularizer):
        raise RegUsageError(
            f"register_for_checkpointing(accelerator, reg) takes a compiled regdsl.Regularizer, got {type(reg).__name__}"
        )
    if not hasattr(accelerator, "register_load_state_pre_hook"):
        raise RegUsageError(
            f"register_for_checkpointing(accelerator, reg) takes an accelerate.Accelerator, got {type(accelerator).__name__}"
        )

    def save(models: Any, weights: Any, output_dir: str) -> None:
        # One writer per file system: Accelerate's own rule for the states it saves.
        on_each_node = accelerator.project_configuration.save_on_each_node
        if accelerator.is_local_main_process if on_each_node else accelerator.is_main_process:
            torch.save(reg.state_dict(), os.path.join(output_dir, STATE_FILE))

    def load(models: Any, input_dir: str) -> None:
        path = os.path.join(input_dir, STATE_FILE)
        if not os.path.isfile(path):
            raise RegStateError(
                f"{input_dir} has no {STATE_FILE}: it was saved without "
                "regdsl.integrations.accelerate.register_for_checkpointing(accelerator, reg), so nothing says which "
                "parameter group of its optimizer state is which, and torch would load it by position over the rule "
                "file's groups. Start from its weights alone, with a fresh optimizer"
            )
        reg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
