"""Selectors -> parameters.

A model is read once into a :class:`ParamTable`: one entry per parameter
*tensor* (tied weights are one entry with several names), in module
registration order, with wrapper prefixes (DDP's ``module.``, torch.compile's
``_orig_mod.``, FSDP and checkpoint wrappers) removed so rules written for the
bare model keep working when it is wrapped. ``check``, ``explain`` and
``compile`` all read a model through this one table.

Names and owners are the ones users write: a wrapped layer is found under its
own name with its own class; the originals of a parametrized tensor
(``register_parametrization``, ``weight_norm``, ``spectral_norm``) are named
under that tensor (``fc1.weight.original0``) and belong to the layer (``fc1``),
not to torch's ``parametrizations`` container.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

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
    """torch.nn's normalization layers, and any class (or module base class) whose name ends in
    ``Norm`` (custom RMSNorms)."""
    return isinstance(module, _norm_classes()) or any(
        c.__name__.endswith("Norm") for c in module_bases(module_class(module))
    )


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


def module_class(module: nn.Module) -> type:
    """The module's class as its author wrote it.

    register_parametrization swaps in a generated subclass (``ParametrizedLinear``);
    that is machinery of one tensor, not the layer's type, so it is skipped.
    """
    cls = type(module)
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
        names = frozenset(class_names(c))
        for pattern in patterns:
            if pattern_matches_any(pattern, names):
                return pattern, c
    return None


def base_class_match(atom: TypeAtom, owners: tuple[nn.Module, ...]) -> tuple[str, type, type] | None:
    """``(pattern, class, base)`` when ``atom`` holds for these owners only through a base class;
    None when an owner's own class matches, or nothing does. explain() reports the former."""
    found = None
    for owner in owners:
        match = type_match(atom.patterns, cls := module_class(owner))
        if match is not None:
            if match[1] is cls:
                return None
            found = found or (match[0].text, cls, match[1])
    return found


def is_bias_name(attribute: str) -> bool:
    """``bias``, or a name ending in ``_bias`` (MultiheadAttention's ``in_proj_bias``). ``bias_k`` and
    ``bias_v`` are MultiheadAttention's learned key/value tokens, not biases."""
    return attribute == "bias" or attribute.endswith("_bias")


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


def original_of(name: str, owner: nn.Module) -> tuple[str, str] | None:
    """``(tensor, what computes it)`` when parameter ``name`` of ``owner`` is an original of a
    parametrized tensor: ``fc1.weight.original0`` -> ``("fc1.weight", "_WeightNorm")``, old-style
    ``fc1.weight_g`` -> ``("fc1.weight", "torch.nn.utils.weight_norm")``; else None."""
    head, _, last = name.rpartition(".")
    if parametrize.is_parametrized(owner) and _is_original(last):
        tensor = head.rpartition(".")[2]
        if tensor in owner.parametrizations:
            return head, ", ".join(type(p).__name__ for p in owner.parametrizations[tensor])
    for hook in owner._forward_pre_hooks.values():
        suffixes = _old_style_hooks().get(type(hook), ())
        if any(last == f"{hook.name}{s}" for s in suffixes):
            return (f"{head}." if head else "") + hook.name, type(hook).__module__
    return None


def _is_original(segment: str) -> bool:
    # torch's names: 'original', or 'original0', 'original1'... when right_inverse returns several.
    return segment == "original" or (segment.startswith("original") and segment[8:].isdigit())


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
    def originals(self) -> tuple[tuple[str, str] | None, ...]:
        """Per name, :func:`original_of`: the parametrized tensor it is an original of, if any."""
        return tuple(original_of(n, o) for n, o in zip(self.names, self.owners))

    @property
    def tensors(self) -> tuple[str, ...]:
        """Per name, the tensor users write for it: the name itself, or the parametrized tensor
        (``fc1.weight``) this one is an original of."""
        return tuple(o[0] if o else n for n, o in zip(self.names, self.originals))

    @property
    def parametrization(self) -> tuple[str, str] | None:
        """``(tensor, what computes it)`` for an original of a parametrized tensor, else None."""
        return next((o for o in self.originals if o), None)

    @functools.cached_property
    def paths(self) -> frozenset[str]:
        """Each full name and the name of every module that contains it; an old-style weight_norm's
        ``fc1.weight_g`` is also under ``fc1.weight``, the tensor it computes."""
        out = set()
        for name in {*self.names, *self.tensors}:
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return frozenset(out)

    @functools.cached_property
    def owner_class_names(self) -> frozenset[str]:
        return frozenset(n for owner in self.owners for n in type_names(module_class(owner)))


def canonical_name(name: str) -> str:
    """A torch name (a state_dict key) as the ParamTable names it: no wrapper segments, and
    ``fc1.parametrizations.weight.original0`` as ``fc1.weight.original0``."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_SEGMENTS]
    kept = (p for i, p in enumerate(parts) if not (p == "parametrizations" and _in_parametrization(parts[i + 1 :])))
    return ".".join(kept)


def _in_parametrization(rest: list[str]) -> bool:
    # After the container: the tensor's name, then an original or a parametrization's index.
    return len(rest) >= 2 and (_is_original(rest[1]) or rest[1].isdigit())


def _walk(
    module: nn.Module, name: str = "", owner: nn.Module | None = None, hidden: bool = False
) -> Iterator[tuple[str, nn.Module, nn.Module, bool]]:
    """``(name, module, owner of its own parameters, hidden)`` for every module, pre-order, shared
    ones under each name, as ``named_modules(remove_duplicate=False)``; but a wrapper's inner module
    takes the wrapper's name, and a parametrized tensor's modules sit under the tensor's name, owned
    by the layer and ``hidden`` (they compute a weight; they are not layers)."""
    yield name, module, owner or module, hidden
    for child_name, child in module._modules.items():
        if child is None:
            continue
        if child_name in _WRAPPER_SEGMENTS:
            yield from _walk(child, name, None, hidden)
        elif child_name == "parametrizations" and parametrize.is_parametrized(module):
            for tensor, chain in child.items():
                yield from _walk(chain, f"{name}.{tensor}" if name else tensor, module, True)
        else:
            yield from _walk(child, f"{name}.{child_name}" if name else child_name, None, hidden)


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
    """Every parameter of a model, deduplicated by tensor identity, in registration order.

    ``module_names`` holds every module by the name users write (a wrapped layer as itself);
    ``modules`` each module once, leaving out the modules that compute a parametrized tensor
    (these are what activity terms can select); ``modules_by_name`` the object an activity
    term hooks for each of those names.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        root = unwrap(model)
        by_tensor: dict[int, tuple[torch.nn.Parameter, list[str], list[nn.Module]]] = {}
        module_names: dict[str, nn.Module] = {}
        outermost: dict[str, nn.Module] = {}
        hidden: set[int] = set()
        for module_name, module, owner, inside in _walk(root):
            # A wrapper comes before the module it wraps, under the same name: the wrapped one,
            # the user's layer, is what the name means (its class is what 'type' sees).
            module_names[module_name] = module
            outermost.setdefault(module_name, module)
            if inside:
                hidden.add(id(module))
            for param_name, param in module._parameters.items():
                if param is None:
                    continue
                full = f"{module_name}.{param_name}" if module_name else param_name
                _, names, owners = by_tensor.setdefault(id(param), (param, [], []))
                if full not in names:
                    names.append(full)
                    owners.append(owner)
        self.entries: list[ParamEntry] = [
            ParamEntry(index=i, param=param, names=tuple(names), owners=tuple(owners))
            for i, (param, names, owners) in enumerate(by_tensor.values())
        ]
        self.module_names = module_names
        # Each module object once, under its first name; the root is "" (the model's own output).
        # A parametrization's modules are no layer whose output an activity term could mean.
        seen: set[int] = set(hidden)
        self.modules: list[tuple[str, nn.Module]] = []
        for name, module in module_names.items():
            if id(module) not in seen:
                seen.add(id(module))
                self.modules.append((name, module))
        # What an activity term hooks: the outermost object under the name. Its output is the
        # layer's, and its hook runs once per call; a checkpoint wrapper runs the wrapped
        # forward again during backward, which would collect the activity twice.
        self.modules_by_name = {name: outermost[name] for name, _ in self.modules}

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
        return any(is_bias_name(tensor.rsplit(".", 1)[-1]) for tensor in entry.tensors)
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
        # A parametrized tensor's modules are no sublayers: a weight-normed Linear is still a layer.
        machinery = "parametrizations" if parametrize.is_parametrized(module) else None
        return all(child_name == machinery for child_name, _ in module.named_children())
    if isinstance(atom, LayerAtom):
        return any(glob_regex(p.text).fullmatch(name) for p in atom.patterns)
    if isinstance(atom, TypeAtom):
        return type_match(atom.patterns, module_class(module)) is not None
    if isinstance(atom, NormAtom):
        return is_norm_module(module)
    if isinstance(atom, EmbeddingAtom):
        return is_embedding_module(module)
    return False  # bias names a parameter, never a module


def pattern_matches_any(pattern: Pattern, names: frozenset[str]) -> bool:
    regex = glob_regex(pattern.text)
    return any(regex.fullmatch(name) for name in names)
