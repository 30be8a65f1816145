"""A step of another optimizer over parameters whose attached optimizer was garbage-collected.

``reg.attach(opt)`` puts regdsl's hooks on ``opt``. When ``opt`` is garbage-collected while the
regularizer lives (a new optimizer replaced it, as in a second phase of training), the new one has
none of those hooks: its steps fold nothing, run no post-step term and count no step.
``penalty()`` warns and holds the folded terms again, but a loop whose every term was folded
leaves ``penalty()`` out, and would train on without them, silently. So the first step of another
optimizer over those parameters warns.

torch calls a process-wide step pre-hook at every optimizer's step. regdsl registers one, once,
at the first ``attach`` that installs hooks. It is registered there and never later, because the
collector that frees the old optimizer may run inside an optimizer's loop over these hooks, where
adding one breaks that loop. Until an attached optimizer is lost, the hook returns at once: about
0.3 µs a step, measured on a CPU (docs/fold.md). A step compiled with ``torch.compile(opt.step)``
is not watched (the hook returns while traced).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# Attachments (regdsl.attach.Attachment) that lost an optimizer whose hooks applied something, until
# they have warned, or have nothing left to say.
_watched: weakref.WeakSet[Any] = weakref.WeakSet()
_handle: Any = None


def watch_steps() -> None:
    """Register the process-wide step pre-hook, the first time only."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_stepped)


def watch(attachment: Any) -> None:
    """From now on, show ``attachment`` every optimizer step (its ``stepped_elsewhere``)."""
    _watched.add(attachment)


def unwatch(attachment: Any) -> None:
    _watched.discard(attachment)


def _stepped(optimizer: Any, args: Any, kwargs: Any) -> None:
    # torch.compile(opt.step) traces the global pre-hooks too: weak references, a set changing under
    # the trace and a warning made dynamo fail the step of any optimizer in the process. A compiled
    # step is not watched; the replacement's next eager step is.
    if torch.compiler.is_compiling():
        return
    if _watched:
        for attachment in list(_watched):
            attachment.stepped_elsewhere(optimizer)
