"""Reading a model's module tree the way users name it.

Wrappers are seen through: DDP, DataParallel, AveragedModel and ``torch.compile`` at the
root (:func:`unwrap`), FSDP, checkpoint and compile wrappers anywhere inside (their
attribute names never show in a name). The modules that compute a parametrized tensor sit
under that tensor's name (``fc1.weight``), owned by the layer. :func:`canonical_name` maps
a torch name (a ``state_dict`` key) onto these names.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.nn.utils import parametrize

from .classes import is_original

# Wrapper attributes that appear inside parameter names but are not part of the user's model.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


@functools.cache
def _root_wrappers() -> tuple[type, ...]:
    from torch.optim.swa_utils import AveragedModel

    return (nn.parallel.DistributedDataParallel, nn.DataParallel, AveragedModel)


def canonical_name(name: str) -> str:
    """A torch name (a state_dict key) as the ParamTable names it: no wrapper segments, and
    ``fc1.parametrizations.weight.original0`` as ``fc1.weight.original0``."""
    parts = [part for part in name.split(".") if part not in WRAPPER_SEGMENTS]
    kept = (p for i, p in enumerate(parts) if not (p == "parametrizations" and _in_parametrization(parts[i + 1 :])))
    return ".".join(kept)


def _in_parametrization(rest: list[str]) -> bool:
    # After the container: the tensor's name, then an original or a parametrization's index.
    return len(rest) >= 2 and (is_original(rest[1]) or rest[1].isdigit())


def walk(root: nn.Module) -> tuple[list[str], list[nn.Module], list[nn.Module | None], set[int]]:
    """Every module, pre-order, shared ones under each name, as ``named_modules(remove_duplicate=False)``:
    their names, the modules, the owner of each one's parameters (None: itself), and the ids of the
    hidden ones. A wrapper's inner module takes the wrapper's name, and a parametrized tensor's modules
    sit under the tensor's name, owned by the layer and hidden (they compute a weight; they are not layers)."""
    names: list[str] = []
    modules: list[nn.Module] = []
    owners: list[nn.Module | None] = []
    hidden: set[int] = set()
    # An explicit stack, not recursive generators: each yield through nested generators costs per level.
    stack: list[tuple[str, nn.Module, nn.Module | None, bool]] = [("", root, None, False)]
    while stack:
        name, module, owner, inside = stack.pop()
        names.append(name)
        modules.append(module)
        owners.append(owner)
        if inside:
            hidden.add(id(module))
        children = module._modules
        if not children:
            continue
        prefix = f"{name}." if name else ""
        found = []
        for child_name, child in children.items():
            if child is None:
                continue
            if child_name in WRAPPER_SEGMENTS:
                found.append((name, child, None, inside))
            elif child_name == "parametrizations" and parametrize.is_parametrized(module):
                found += [(prefix + tensor, chain, module, True) for tensor, chain in child.items()]
            else:
                found.append((prefix + child_name, child, None, inside))
        found.reverse()
        stack += found
    return names, modules, owners, hidden


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP, DataParallel, AveragedModel and torch.compile wrappers, in any nesting."""
    while True:
        if isinstance(model, _root_wrappers()):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile; checked by name so torch._dynamo is never imported
        else:
            return model
