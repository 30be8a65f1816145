"""regdsl: declarative, checkable regularization for PyTorch models.

    spec = regdsl.load("rules.reg")
    reg = spec.compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-3))
    loss = criterion(model(x), y) + reg.penalty()
"""

from .build import load, parse
from .compile import GroupSummary, ParamRow, Regularizer, Setting, compile
from .errors import (
    Diagnostic,
    RegCompileError,
    RegDslError,
    RegSyntaxError,
    RegUsageError,
    RegValidationError,
)
from .report import format_explain, format_groups
from .spec import Spec

__all__ = [
    "Diagnostic",
    "GroupSummary",
    "ParamRow",
    "RegCompileError",
    "RegDslError",
    "RegSyntaxError",
    "RegUsageError",
    "RegValidationError",
    "Regularizer",
    "Setting",
    "Spec",
    "compile",
    "format_explain",
    "format_groups",
    "load",
    "parse",
]

__version__ = "0.1.0"
