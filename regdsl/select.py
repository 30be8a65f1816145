"""Selectors -> parameters.

A model is read once into a :class:`ParamTable`: one entry per parameter
*tensor* (tied weights are one entry with several names), in module
registration order, with wrapper prefixes (DDP's ``module.``, torch.compile's
``_orig_mod.``, FSDP and checkpoint wrappers) removed (:mod:`regdsl.walk`) so rules
written for the bare model keep working when it is wrapped. ``check``, ``explain`` and
``compile`` all read a model through this one table.

Names and owners are the ones users write: a wrapped layer is found under its
own name with its own class; the originals of a parametrized tensor
(``register_parametrization``, ``weight_norm``, ``spectral_norm``) are named
under that tensor (``fc1.weight.original0``) and belong to the layer (``fc1``),
not to torch's ``parametrizations`` container.

Reading a model is on the path of every ``compile``, and models reach tens of
thousands of tensors, so the table is built in one pass that does per tensor
only what names it, into columns (a :class:`ParamEntry` is made when asked,
:mod:`regdsl.entries`); what a class or a module says is asked once per class
(:mod:`regdsl.classes`), and a selector is judged against the whole table at
once (:mod:`regdsl.matching`).
"""

from __future__ import annotations

import functools
from itertools import accumulate, compress
from operator import attrgetter, not_
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

# What the class of a module says lives in classes.py; importable from here as it always was.
from .classes import (
    base_class_match,
    class_may_be_parametrized,
    class_names,
    computes_tensors,
    is_bias_name,
    is_embedding_module,
    is_norm_module,
    module_bases,
    module_class,
    original_of,
    type_match,
    type_names,
)
from .entries import Entries, ParamEntry
from .glob import glob_regex
from .spec import AllAtom, Atom, BiasAtom, EmbeddingAtom, LayerAtom, NormAtom, Pattern, Selector, TypeAtom
from .walk import canonical_name, unwrap, walk

__all__ = [
    "ParamEntry", "ParamTable", "atom_matches", "base_class_match", "canonical_name", "class_names", "glob_regex",
    "is_bias_name", "is_embedding_module", "is_norm_module", "module_bases", "module_class", "module_matches",
    "original_of", "pattern_matches_any", "type_match", "type_names", "unwrap",
]

class ParamTable:
    """Every parameter of a model, deduplicated by tensor identity, in registration order.

    ``params``, ``names``, ``owners`` and ``trainable`` are its columns, one item per entry (the
    first name and owner of a tied tensor); ``entries`` the :class:`ParamEntry` of each, made when
    read. ``module_names`` holds every module by the name users write (a wrapped layer as itself);
    ``modules`` each module once, leaving out the modules that compute a parametrized tensor
    (these are what activity terms can select); ``modules_by_name`` the object an activity
    term hooks for each of those names.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self._names, self._modules, owners_of, self._hidden = walk(unwrap(model))
        # Columns, one item per registration (see regdsl.entries): this loop runs once per tensor and
        # makes no object. Whether a tensor is registered twice (tied) is asked once afterwards, in C.
        params: list[torch.Tensor] = []
        names: list[str] = []
        owners: list[nn.Module] = []
        # Entries by owner class, then attribute name: what every atom but 'layer' and 'all' reads.
        by_class: dict[type, dict[str, list[int]]] = {}
        computing: list[int] = []  # positions whose owner may compute a tensor from them (parametrizations)
        # Per owner class: its attributes' members, and whether the class itself may carry a
        # 'parametrizations' (what computes_tensors() reads first, asked once per class).
        per_class: dict[type, tuple[dict[str, list[int]], bool]] = {}
        for module_name, module, owner in zip(self._names, self._modules, owners_of):
            module_params = module._parameters
            if not module_params:
                continue
            owner = owner or module
            found = per_class.get(cls := type(owner))
            if found is None:
                attributes = by_class[cls] = {}
                found = per_class[cls] = (attributes, class_may_be_parametrized(cls))
            attributes, may_compute = found
            start = len(params)
            prefix = f"{module_name}." if module_name else ""
            for attribute, param in module_params.items():
                if param is None:
                    continue
                members = attributes.get(attribute)
                if members is None:
                    attributes[attribute] = [len(params)]
                else:
                    members.append(len(params))
                params.append(param)
                names.append(prefix + attribute)
                owners.append(owner)
            # computes_tensors() in full only where a hook or a 'parametrizations' could be.
            if (
                (may_compute or owner._forward_pre_hooks or "parametrizations" in owner._modules
                 or "parametrizations" in owner.__dict__)
                and computes_tensors(owner)
            ):  # fmt: skip
                computing += range(start, len(params))
        self.kinds: dict[tuple[Any, ...], list[int]] = {
            ((cls,), (attribute,)): members for cls, attributes in by_class.items() for attribute, members in attributes.items()
        }
        # What the first name does not tell, in the order met: a tensor whose owner computes a
        # tensor from it (full is None), another name of a tensor already read (tied weights).
        retold: list[tuple[int, str | None, nn.Module, bool]]
        if len(set(map(id, params))) < len(params):
            retold = self._drop_repeats(params, names, owners, computing)
        else:
            retold = [(i, None, owners[i], False) for i in computing]
        self.params, self.names, self.owners = params, names, owners
        self.trainable: list[bool] = list(map(attrgetter("requires_grad"), params))  # as the table saw them
        self.entries = Entries(params, names, owners, self.trainable)
        self.tied: list[int] = []  # indices of the entries with more than one name
        self.unusual: list[int] = []  # ... or with a name that is not the tensor users write (parametrizations)
        if retold:
            self._retell(self._told_again(retold))

    def _drop_repeats(
        self, params: list[torch.Tensor], names: list[str], owners: list[nn.Module], computing: list[int]
    ) -> list[tuple[int, str | None, nn.Module, bool]]:
        """Remove (in place) every registration of a tensor after its first, renumbering the kinds;
        returns what the first names do not tell (as in __init__), by the entries' indices."""
        first: dict[int, int] = {}
        keep = [first.setdefault(id(p), at) == at for at, p in enumerate(params)]
        new_of = list(accumulate(keep, initial=-1))[1:]  # a kept position's index among the kept
        computes = set(computing)
        retold = [
            (new_of[at], None, owners[at], False)
            if keep[at]
            else (new_of[first[id(params[at])]], names[at], owners[at], at not in computes)
            for at in sorted(computes.union(compress(range(len(keep)), map(not_, keep))))
        ]
        for key, members in self.kinds.items():
            self.kinds[key] = [new_of[at] for at in members if keep[at]]
        params[:], names[:], owners[:] = compress(params, keep), compress(names, keep), compress(owners, keep)
        return retold

    def _told_again(self, retold: list[tuple[int, str | None, nn.Module, bool]]) -> list[ParamEntry]:
        """The entries of tied and parametrized tensors, each with all its names, in the order first met."""
        out: list[ParamEntry] = []
        for index, full, owner, plain in retold:
            entry = self.entries[index]
            if full is None:
                entry.plain = False
                out.append(entry)
            elif full not in entry.names:
                if entry._names is None and entry.plain:
                    out.append(entry)
                entry.add_name(full, owner, plain)
        return out

    def _retell(self, retold: list[ParamEntry]) -> None:
        """Move tied and parametrized entries to the kind all their names and owners make."""
        moved = {e.index for e in retold}
        kinds: dict[tuple[Any, ...], list[int]] = {}
        for key, members in self.kinds.items():
            kept = [i for i in members if i not in moved]
            if kept:
                kinds[key] = kept
        self.unusual = sorted(e.index for e in retold)
        self.tied = [i for i in self.unusual if self.entries[i]._names is not None]
        for entry in retold:
            kinds.setdefault((entry.types, entry.attributes), []).append(entry.index)
        self.kinds = {key: sorted(members) for key, members in kinds.items()}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def root(self) -> nn.Module:
        """The model read, wrappers at its root seen through (what ``attach`` reads again)."""
        return self._modules[0]

    @functools.cached_property
    def module_names(self) -> dict[str, nn.Module]:
        # A wrapper comes before the module it wraps, under the same name: the wrapped one,
        # the user's layer, is what the name means (its class is what 'type' sees).
        return dict(zip(self._names, self._modules))

    @functools.cached_property
    def modules(self) -> list[tuple[str, nn.Module]]:
        # Each module object once, under its first name; the root is "" (the model's own output).
        # A parametrization's modules are no layer whose output an activity term could mean.
        seen = set(self._hidden)
        out = []
        for name, module in self.module_names.items():
            if id(module) not in seen:
                seen.add(id(module))
                out.append((name, module))
        return out

    @functools.cached_property
    def modules_by_name(self) -> dict[str, nn.Module]:
        # What an activity term hooks: the outermost object under the name. Its output is the
        # layer's, and its hook runs once per call; a checkpoint wrapper runs the wrapped
        # forward again during backward, which would collect the activity twice.
        outermost: dict[str, nn.Module] = {}
        for name, module in zip(self._names, self._modules):
            outermost.setdefault(name, module)
        return {name: outermost[name] for name, _ in self.modules}

    @functools.cached_property
    def matcher(self) -> Any:
        """Selectors judged against the whole table, each distinct one once (:mod:`regdsl.matching`)."""
        from .matching import Matcher

        return Matcher(self)

    def select(self, selector: Selector) -> list[ParamEntry]:
        """Entries that every atom of ``selector`` matches, in table order."""
        return [self.entries[i] for i in self.matcher.params(selector)]


def atom_matches(atom: Atom, entry: ParamEntry) -> bool:
    """One atom on one entry; :mod:`regdsl.matching` gives the same answers for a whole table at once."""
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

