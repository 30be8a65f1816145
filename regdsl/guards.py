"""What the runtime refuses or warns about in a training loop, so that no rule silently does
nothing: parameters replaced since compile(), activity terms no loss received or no hook collects,
and AdamW decay too small to move 16-bit weights (:mod:`regdsl.precision`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .errors import RegDslWarning, RegUsageError, caller_stacklevel
from .precision import decay_underflows


def check_parameters_current(entries: Sequence[Any]) -> None:
    """Refuse to run on parameters the model no longer holds: fully_shard or
    load_state_dict(assign=True) after compile() replace them, and the terms would act on tensors
    nothing trains. One registered parameter is compared, which catches both."""
    entry = next((e for e in entries if e.trainable and e.plain and e._names is None), None)
    if entry is None:
        return
    current = entry.owner._parameters.get(entry.name.rpartition(".")[2], entry.param)
    if current is not entry.param:
        raise RegUsageError(
            f"the model's parameter '{entry.name}' is not the tensor compile() saw: it was replaced since "
            "(fully_shard, load_state_dict(assign=True), assigning a new nn.Parameter); compile again after "
            "replacing parameters, then build the optimizer from the new reg.param_groups()"
        )


def warn_decay_underflow(optimizer: torch.optim.Optimizer, groups: Sequence[tuple[Any, Any]]) -> None:
    lines = {key.name: key.decay.pos.line for key, _ in groups if key.decay is not None and key.decay.pos is not None}
    for message in decay_underflows(optimizer, lines):
        warnings.warn(RegDslWarning(message), stacklevel=caller_stacklevel())


def warn_untaken(targets: Sequence[Any]) -> None:
    """An optimizer step ran (inside torch's step hook) with activity values no penalty() took."""
    warnings.warn(
        RegDslWarning(
            f"an optimizer step ran while activity terms{_lines(targets)} collected in the forward pass were never "
            "added to a loss: add reg.penalty() to the loss of each training step, or they do nothing"
        ),
        stacklevel=caller_stacklevel(through_torch=True),
    )


def warn_not_listening(targets: Sequence[Any]) -> None:
    warnings.warn(
        RegDslWarning(
            f"penalty() holds no activity terms{_lines(targets)}: detach() removed their forward hooks; attach() "
            "again, or call after_step() after each optimizer step, and they collect from the next forward pass"
        ),
        stacklevel=caller_stacklevel(),
    )


def _lines(targets: Sequence[Any]) -> str:
    lines = sorted({t.term.pos.line for t in targets if t.term.pos is not None})
    return f" (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})" if lines else ""
