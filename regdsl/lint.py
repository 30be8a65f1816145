"""``regdsl.check``: what a rule file does wrong against a real model.

It runs the very diagnostics ``compile`` enforces (:mod:`regdsl.diagnose`):
patterns and selectors that match nothing, type names no module has, rules
whose every effect a later line overrides, terms that cannot work on their
parameter, excludes that match nothing, rules that hit only frozen parameters,
tied parameters whose names different rules pick, decay stacked on l2, and a
model with nothing to train.

What is checked statically, without running the model, is only what the
parameters and modules show: a loss term on a parameter that the forward pass
never uses cannot be seen here (the model is never run, and may live on meta).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .diagnose import NOT_GIVEN, diagnose
from .errors import Diagnostic
from .resolution import Resolution, resolve
from .spec import Spec


def check(spec: Spec, model: nn.Module, reference: Mapping[str, Any] | None | object = NOT_GIVEN) -> list[Diagnostic]:
    """Every problem of ``spec`` against ``model``, sorted by position; ``reference`` as for ``compile``."""
    if not isinstance(spec, Spec):
        raise TypeError(f"check() takes a Spec (regdsl.parse(text) or regdsl.load(path)), not a {type(spec).__name__}")
    return check_resolution(resolve(spec, model), reference)


def check_resolution(resolution: Resolution, reference: Mapping[str, Any] | None | object = NOT_GIVEN) -> list[Diagnostic]:
    """:func:`check` on a resolution already made (the CLI also reads its coverage)."""
    return diagnose(resolution, reference)
