"""Selectors -> parameters.

A model is read once into a :class:`ParamTable`: one entry per parameter
*tensor* (tied weights are one entry with several names), in module
registration order, with wrapper prefixes (DDP's ``module.``, torch.compile's
``_orig_mod.``, FSDP and checkpoint wrappers) removed so rules written for the
bare model keep working when it is wrapped.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .glob import glob_regex
from .spec import AllAtom, Atom, BiasAtom, EmbeddingAtom, LayerAtom, NormAtom, Pattern, Selector, TypeAtom

# Wrapper attributes that appear inside parameter names but are not part of the user's model.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@functools.cache
def _root_wrappers() -> tuple[type, ...]:
    from torch.optim.swa_utils import AveragedModel

    return (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)


@functools.cache
def _norm_classes() -> tuple[type, ...]:
    names = ("LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "CrossMapLRN2d")
    found = tuple(getattr(nn, name) for name in names if hasattr(nn, name))
    # _NormBase is the base of every BatchNorm, InstanceNorm and SyncBatchNorm.
    return found + (nn.modules.batchnorm._NormBase,)


def is_norm_module(module: nn.Module) -> bool:
    """torch.nn's normalization layers, and any class whose name ends in ``Norm`` (custom RMSNorms)."""
    return isinstance(module, _norm_classes()) or type(module).__name__.endswith("Norm")


def is_embedding_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


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


@dataclass(frozen=True, eq=False)
class ParamEntry:
    """One parameter tensor and every name it is registered under."""

    index: int
    param: torch.nn.Parameter
    names: tuple[str, ...]
    owners: tuple[nn.Module, ...]  # owners[i] holds the tensor directly as names[i]

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def trainable(self) -> bool:
        return self.param.requires_grad

    @property
    def initialized(self) -> bool:
        """False for a lazy module's parameter before its first forward pass."""
        return not isinstance(self.param, nn.parameter.UninitializedParameter)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """None for an uninitialized lazy parameter."""
        return tuple(self.param.shape) if self.initialized else None

    @property
    def numel(self) -> int:
        return self.param.numel() if self.initialized else 0

    @functools.cached_property
    def paths(self) -> frozenset[str]:
        """Each full name and the name of every module that contains it."""
        out = set()
        for name in self.names:
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return frozenset(out)

    @functools.cached_property
    def owner_class_names(self) -> frozenset[str]:
        return frozenset(n for owner in self.owners for n in class_names(type(owner)))


def canonical_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP, DataParallel, AveragedModel and torch.compile wrappers, in any nesting."""
    while True:
        if isinstance(model, _root_wrappers()):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile; checked by name so torch._dynamo is never imported
        else:
            return model


class ParamTable:
    """Every parameter of a model, deduplicated by tensor identity, in registration order."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        root = unwrap(model)
        by_tensor: dict[int, tuple[torch.nn.Parameter, list[str], list[nn.Module]]] = {}
        module_names: dict[str, nn.Module] = {}
        for module_name, module in root.named_modules(remove_duplicate=False):
            module_name = canonical_name(module_name)
            module_names.setdefault(module_name, module)
            for param_name, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{module_name}.{param_name}" if module_name else param_name
                _, names, owners = by_tensor.setdefault(id(param), (param, [], []))
                if full not in names:
                    names.append(full)
                    owners.append(module)
        self.entries: list[ParamEntry] = [
            ParamEntry(index=i, param=param, names=tuple(names), owners=tuple(owners))
            for i, (param, names, owners) in enumerate(by_tensor.values())
        ]
        self.module_names = module_names
        # Each module object once, under its first name; the root is "" (the model's own output).
        seen: set[int] = set()
        self.modules: list[tuple[str, nn.Module]] = []
        for name, module in module_names.items():
            if id(module) not in seen:
                seen.add(id(module))
                self.modules.append((name, module))
        self.modules_by_name = dict(self.modules)

    def __len__(self) -> int:
        return len(self.entries)

    def select(self, selector: Selector) -> list[ParamEntry]:
        """Entries that every atom of ``selector`` matches, in table order."""
        return [e for e in self.entries if all(atom_matches(atom, e) for atom in selector.atoms)]


def atom_matches(atom: Atom, entry: ParamEntry) -> bool:
    if isinstance(atom, AllAtom):
        return True
    if isinstance(atom, LayerAtom):
        return any(pattern_matches_any(p, entry.paths) for p in atom.patterns)
    if isinstance(atom, TypeAtom):
        return any(pattern_matches_any(p, entry.owner_class_names) for p in atom.patterns)
    if isinstance(atom, BiasAtom):
        return any(name.rsplit(".", 1)[-1] == "bias" for name in entry.names)
    if isinstance(atom, NormAtom):
        return any(is_norm_module(owner) for owner in entry.owners)
    if isinstance(atom, EmbeddingAtom):
        return any(is_embedding_module(owner) for owner in entry.owners)
    raise AssertionError(f"unhandled atom {atom!r}")  # pragma: no cover - the spec admits no other atom


def module_matches(atom: Atom, name: str, module: nn.Module) -> bool:
    """An atom read as a statement about a module (activity terms select module outputs).

    ``all`` is every module without submodules (a layer, not a container);
    ``layer`` matches the module's own name; ``bias`` matches no module.
    """
    if isinstance(atom, AllAtom):
        return next(iter(module.children()), None) is None
    if isinstance(atom, LayerAtom):
        return any(glob_regex(p.text).fullmatch(name) for p in atom.patterns)
    if isinstance(atom, TypeAtom):
        names = frozenset(class_names(type(module)))
        return any(pattern_matches_any(p, names) for p in atom.patterns)
    if isinstance(atom, NormAtom):
        return is_norm_module(module)
    if isinstance(atom, EmbeddingAtom):
        return is_embedding_module(module)
    return False  # bias names a parameter, never a module


def pattern_matches_any(pattern: Pattern, names: frozenset[str]) -> bool:
    regex = glob_regex(pattern.text)
    return any(regex.fullmatch(name) for name in names)
