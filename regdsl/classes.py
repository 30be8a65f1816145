"""What a module's class and a parameter's name say to a selector: ``type``, ``norm``,
``embedding`` and ``bias``, and which tensors are originals of parametrized ones.

Everything here depends on a module's class, not on the module, so it is
computed once per class: a model of 10,000 Linears asks about one class.
"""

from __future__ import annotations

import functools
import re
import sys

from torch import nn
from torch.nn.utils import parametrize

from .glob import glob_regex
from .nodes import Pattern, TypeAtom


@functools.cache
def _norm_classes() -> tuple[type, ...]:
    names = ("LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "CrossMapLRN2d")
    found = tuple(getattr(nn, name) for name in names if hasattr(nn, name))
    # _NormBase is the base of every BatchNorm, InstanceNorm and SyncBatchNorm.
    return found + (nn.modules.batchnorm._NormBase,)


def is_norm_module(module: nn.Module) -> bool:
    """torch.nn's normalization layers, and any class (or module base class) whose name ends in
    ``Norm`` (custom RMSNorms)."""
    return is_norm_class(type(module))


@functools.cache
def is_norm_class(cls: type) -> bool:
    # A parametrized subclass adds no base of its own, so asking about it is asking about its layer.
    return issubclass(cls, _norm_classes()) or any(c.__name__.endswith("Norm") for c in module_bases(class_of(cls)))


def is_embedding_module(module: nn.Module) -> bool:
    return is_embedding_class(type(module))


@functools.cache
def is_embedding_class(cls: type) -> bool:
    return issubclass(cls, (nn.Embedding, nn.EmbeddingBag))


@functools.cache
def class_names(cls: type) -> tuple[str, ...]:
    """Names a ``type`` pattern may use: ``Linear``, ``torch.nn.modules.linear.Linear``, ``torch.nn.Linear``."""
    names = [cls.__name__, f"{cls.__module__}.{cls.__qualname__}"]
    # Also every shorter public path that re-exports the class (torch.nn.Linear).
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        module = sys.modules.get(prefix)
        if module is not None and module.__dict__.get(cls.__name__) is cls:
            names.append(f"{prefix}.{cls.__qualname__}")
    return tuple(dict.fromkeys(names))


def module_class(module: nn.Module) -> type:
    """The module's class as its author wrote it.

    register_parametrization swaps in a generated subclass (``ParametrizedLinear``);
    that is machinery of one tensor, not the layer's type, so it is skipped.
    """
    return class_of(type(module))


@functools.cache
def class_of(cls: type) -> type:
    """:func:`module_class` for a module of class ``cls``."""
    base = cls.__bases__[0]
    if cls.__module__ == parametrize.__name__ and cls.__name__ == f"Parametrized{base.__name__}":
        return base
    return cls


@functools.cache
def module_bases(cls: type) -> tuple[type, ...]:
    """``cls``, then every base class that is itself a module, nearest first (the MRO).

    nn.Module is the walk's end and is left out: every module is one, so
    ``type Module`` would mean ``all``; it still names a bare nn.Module (a plain
    container holding parameters). Mixins that are not modules
    (transformers' ``GenerationMixin``) are no module class and are skipped too.
    """
    bases = (b for b in cls.__mro__[1:] if issubclass(b, nn.Module) and b is not nn.Module)
    return (cls, *bases)


@functools.cache
def type_names(cls: type) -> frozenset[str]:
    """Every name a ``type`` pattern can match for a module of class ``cls``, base classes included."""
    return frozenset(n for c in module_bases(cls) for n in class_names(c))


def type_match(patterns: tuple[Pattern, ...], cls: type) -> tuple[Pattern, type] | None:
    """The pattern that matches and the class it matched: ``cls`` itself if any pattern names it, else
    the nearest base class one does."""
    for c in module_bases(cls):
        names = class_names(c)
        for pattern in patterns:
            regex = glob_regex(pattern.text)
            if any(regex.fullmatch(name) for name in names):
                return pattern, c
    return None


def base_class_match(atom: TypeAtom, owners: tuple[nn.Module, ...]) -> tuple[str, type, type] | None:
    """``(pattern, class, base)`` when ``atom`` holds for these owners only through a base class;
    None when an owner's own class matches, or nothing does. explain() reports the former."""
    return base_class_match_of(atom, tuple(type(o) for o in owners))


def base_class_match_of(atom: TypeAtom, types: tuple[type, ...]) -> tuple[str, type, type] | None:
    """:func:`base_class_match` for owners of these classes (``type(owner)`` each)."""
    found = None
    for owner_type in types:
        match = type_match(atom.patterns, cls := class_of(owner_type))
        if match is not None:
            if match[1] is cls:
                return None
            found = found or (match[0].text, cls, match[1])
    return found


# torch's recurrent layers name theirs per layer and direction: bias_ih_l0, bias_hh_l1_reverse; cells bias_ih.
_RECURRENT_BIAS = re.compile(r"bias_(?:ih|hh)(?:_l\d+)?(?:_reverse)?")


@functools.lru_cache(maxsize=4096)
def is_bias_name(attribute: str) -> bool:
    """``bias``, a name ending in ``_bias`` (MultiheadAttention's ``in_proj_bias``), or a recurrent
    layer's ``bias_ih_l0``/``bias_hh_l0_reverse`` (RNN, LSTM, GRU and their cells). ``bias_k`` and
    ``bias_v`` are MultiheadAttention's learned key/value tokens, not biases."""
    return attribute == "bias" or attribute.endswith("_bias") or _RECURRENT_BIAS.fullmatch(attribute) is not None


@functools.cache
def _old_style_hooks() -> dict[type, tuple[str, ...]]:
    """The pre-parametrization hooks, by class, and the suffixes of the parameters they compute from."""
    found: dict[type, tuple[str, ...]] = {}
    try:  # deprecated in torch; absent some day
        from torch.nn.utils.weight_norm import WeightNorm

        found[WeightNorm] = ("_g", "_v")
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm

        found[SpectralNorm] = ("_orig",)
    except ImportError:  # pragma: no cover
        pass
    return found


def computes_tensors(owner: nn.Module) -> bool:
    """Whether some parameter of ``owner`` may be an original of a parametrized tensor; when not,
    :func:`original_of` is None for all of them, and a table need not ask name by name."""
    # Asked of every module that holds parameters: the common answer comes from a few dict lookups.
    if not owner._forward_pre_hooks and "parametrizations" not in owner._modules and not may_be_parametrized(owner):
        return False
    if parametrize.is_parametrized(owner):
        return True
    hooks = _old_style_hooks()
    return any(type(hook) in hooks for hook in owner._forward_pre_hooks.values())


def may_be_parametrized(module: nn.Module) -> bool:
    """Whether ``module.parametrizations`` could exist other than as a submodule (checked apart)."""
    return "parametrizations" in module.__dict__ or class_may_be_parametrized(type(module))


@functools.cache
def class_may_be_parametrized(cls: type) -> bool:
    # is_parametrized() reads the attribute 'parametrizations'; a class may define one itself.
    return hasattr(cls, "parametrizations")


def original_of(name: str, owner: nn.Module) -> tuple[str, str] | None:
    """``(tensor, what computes it)`` when parameter ``name`` of ``owner`` is an original of a
    parametrized tensor: ``fc1.weight.original0`` -> ``("fc1.weight", "_WeightNorm")``, old-style
    ``fc1.weight_g`` -> ``("fc1.weight", "torch.nn.utils.weight_norm")``; else None."""
    head, _, last = name.rpartition(".")
    if parametrize.is_parametrized(owner) and is_original(last):
        tensor = head.rpartition(".")[2]
        if tensor in owner.parametrizations:
            return head, ", ".join(type(p).__name__ for p in owner.parametrizations[tensor])
    for hook in owner._forward_pre_hooks.values():
        suffixes = _old_style_hooks().get(type(hook), ())
        if any(last == f"{hook.name}{s}" for s in suffixes):
            return (f"{head}." if head else "") + hook.name, type(hook).__module__
    return None


def is_original(segment: str) -> bool:
    # torch's names: 'original', or 'original0', 'original1'... when right_inverse returns several.
    return segment == "original" or (segment.startswith("original") and segment[8:].isdigit())
