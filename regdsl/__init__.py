"""regdsl: declarative, checkable regularization for PyTorch models.

    spec = regdsl.load("rules.reg")
    reg = spec.compile(model)
    opt = torch.optim.AdamW(reg.param_groups(lr=1e-3))
    reg.attach(opt)  # proximal steps, max-norm and schedules after each opt.step()
    loss = criterion(model(x), y) + reg.penalty()
"""

from typing import TYPE_CHECKING, Any

from .build import load, parse
from .errors import (
    Diagnostic,
    RegCompileError,
    RegDslError,
    RegDslWarning,
    RegStateError,
    RegSyntaxError,
    RegUsageError,
    RegValidationError,
)
from .spec import Spec

if TYPE_CHECKING:  # pragma: no cover
    from .compiler import Regularizer, compile
    from .formatter import format_source
    from .lint import check
    from .report import format_explain, format_groups
    from .resolution import Coverage, GroupSummary, ModuleRow, ParamRow, Resolution, Setting, resolve
    from .spaces import grid

# Names that need torch load on first use, so `regdsl check` on a file stays fast.
_LAZY = {
    "Coverage": "resolution",
    "Resolution": "resolution",
    "resolve": "resolution",
    "check": "lint",
    "format_source": "formatter",
    "GroupSummary": "resolution",
    "ModuleRow": "resolution",
    "ParamRow": "resolution",
    "Regularizer": "compiler",
    "Setting": "resolution",
    "compile": "compiler",
    "format_explain": "report",
    "format_groups": "report",
    "grid": "spaces",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regdsl' has no attribute {name!r}")

__all__ = [
    "Coverage",
    "Diagnostic",
    "GroupSummary",
    "ModuleRow",
    "ParamRow",
    "RegCompileError",
    "RegDslError",
    "RegDslWarning",
    "RegStateError",
    "RegSyntaxError",
    "RegUsageError",
    "RegValidationError",
    "Regularizer",
    "Resolution",
    "Setting",
    "Spec",
    "check",
    "compile",
    "format_explain",
    "format_groups",
    "format_source",
    "grid",
    "load",
    "parse",
    "resolve",
]

__version__ = "0.1.0"
