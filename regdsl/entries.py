"""The parameter tensors of a read model, one :class:`ParamEntry` each, made when first asked.

A :class:`~regdsl.select.ParamTable` keeps what every tensor needs in columns, one list
per field (the tensors, their first names, owners, ``requires_grad``): compiling a model
of tens of thousands of tensors reads those columns, and an object per tensor cost more
than the rest of compiling, twice over: once to make it, once more when the garbage
collector walked it. :class:`Entries` makes the entry of a tensor when code asks for it
(``explain`` asks for all of them, ``compile`` for the few it names), and
:class:`Members` is one optimizer group's entries, whose tensors it lists without making any.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .classes import computes_tensors, module_class, original_of, type_names


@functools.cache
def _uninitialized(cls: type) -> bool:
    # isinstance() on a Parameter goes through torch's metaclass: slow enough to matter per tensor.
    return issubclass(cls, nn.parameter.UninitializedParameter)


class ParamEntry:
    """One parameter tensor and every name it is registered under.

    A snapshot of the model when the table read it: ``trainable`` is the tensor's
    ``requires_grad`` then, as every row and group made from the table saw it.
    """

    # A tensor with one name (nearly all) keeps no tuples of its own: ``names`` and ``owners`` are
    # made when asked. Fewer objects per tensor is less for the garbage collector to walk. What
    # most entries share is a class default, set on the few that differ.
    __slots__ = ("__dict__", "index", "name", "owner", "param", "trainable")
    plain = True
    _names: tuple[str, ...] | None = None
    _owners: tuple[nn.Module, ...] | None = None

    def __init__(
        self,
        index: int,
        param: torch.nn.Parameter,
        names: tuple[str, ...],
        owners: tuple[nn.Module, ...],  # owners[i] holds the tensor directly as names[i]
        trainable: bool | None = None,
        plain: bool | None = None,
    ):
        self.index = index
        self.param = param
        self.name, self.owner = names[0], owners[0]
        if len(names) > 1:
            self._names, self._owners = tuple(names), tuple(owners)
        self.trainable = param.requires_grad if trainable is None else trainable
        # True when no owner computes a tensor from this one: then each name is the tensor users write.
        if not (not any(computes_tensors(o) for o in owners) if plain is None else plain):
            self.plain = False

    @property
    def names(self) -> tuple[str, ...]:
        return self._names or (self.name,)

    @property
    def owners(self) -> tuple[nn.Module, ...]:
        return self._owners or (self.owner,)

    def add_name(self, name: str, owner: nn.Module, plain: bool) -> None:
        """Another name of the same tensor (tied weights, a shared module), while the table is read."""
        self._names, self._owners = (*self.names, name), (*self.owners, owner)
        if not plain:
            self.plain = False
        self.__dict__.pop("originals", None)  # read before this name was known

    def __repr__(self) -> str:
        return f"ParamEntry(index={self.index}, names={self.names!r})"

    @property
    def initialized(self) -> bool:
        """False for a lazy module's parameter before its first forward pass."""
        return not _uninitialized(type(self.param))

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
        if self.plain:
            return (None,) * len(self.names)
        return tuple(original_of(n, o) for n, o in zip(self.names, self.owners))

    @property
    def tensors(self) -> tuple[str, ...]:
        """Per name, the tensor users write for it: the name itself, or the parametrized tensor
        (``fc1.weight``) this one is an original of."""
        if self.plain:
            return self.names
        return tuple(o[0] if o else n for n, o in zip(self.names, self.originals))

    @property
    def parametrization(self) -> tuple[str, str] | None:
        """``(tensor, what computes it)`` for an original of a parametrized tensor, else None."""
        return None if self.plain else next((o for o in self.originals if o), None)

    @functools.cached_property
    def paths(self) -> frozenset[str]:
        """Each full name and the name of every module that contains it; an old-style weight_norm's
        ``fc1.weight_g`` is also under ``fc1.weight``, the tensor it computes."""
        out = set()
        for name in {*self.names, *self.tensors}:
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return frozenset(out)

    @property
    def types(self) -> tuple[type, ...]:
        """The class of each owner (as ``type()`` says, parametrized subclasses included)."""
        return tuple(type(o) for o in self.owners)

    @functools.cached_property
    def owner_class_names(self) -> frozenset[str]:
        return frozenset(n for owner in self.owners for n in type_names(module_class(owner)))

    @property
    def attributes(self) -> tuple[str, ...]:
        """The last segment of each tensor's name: what ``bias`` reads."""
        return tuple(tensor.rpartition(".")[2] for tensor in self.tensors)


class Entries(Sequence[ParamEntry]):
    """A table's entries in table order, each made from the columns when first read, then kept:
    the same index gives the same object every time."""

    __slots__ = ("_made", "names", "owners", "params", "trainable")

    def __init__(self, params: list[torch.Tensor], names: list[str], owners: list[nn.Module], trainable: list[bool]):
        self.params, self.names, self.owners, self.trainable = params, names, owners, trainable
        self._made: list[ParamEntry | None] = [None] * len(params)

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        entry = self._made[i]
        if entry is None:
            i = range(len(self))[i]
            # Slots set here rather than through __init__: explain() makes one per tensor.
            entry = self._made[i] = object.__new__(ParamEntry)
            entry.index, entry.param, entry.name = i, self.params[i], self.names[i]
            entry.owner, entry.trainable = self.owners[i], self.trainable[i]
        return entry

    def __iter__(self) -> Iterator[ParamEntry]:
        return map(self.__getitem__, range(len(self)))

    def made(self) -> int:
        """How many entries exist so far (tests count them)."""
        return len(self._made) - self._made.count(None)

    def __repr__(self) -> str:
        return f"Entries({len(self)} tensors)"


class Members(Sequence[ParamEntry]):
    """Some entries of a table, by index in table order (an optimizer group's): read as entries,
    or as :attr:`params` and :attr:`names`, which make none."""

    __slots__ = ("_entries", "indices")

    def __init__(self, entries: Entries, indices: list[int]):
        self._entries, self.indices = entries, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._entries[j] for j in self.indices[i]]
        return self._entries[self.indices[i]]

    def __iter__(self) -> Iterator[ParamEntry]:
        return map(self._entries.__getitem__, self.indices)

    def only(self, ids: set[int]) -> Members:
        """The members whose tensor's ``id`` is in ``ids``, in the same order."""
        return Members(self._entries, [i for i, p in zip(self.indices, self.params) if id(p) in ids])

    @property
    def params(self) -> list[torch.Tensor]:
        """The tensors, a new list each time (an optimizer keeps the one it is given)."""
        return list(map(self._entries.params.__getitem__, self.indices))

    @property
    def names(self) -> tuple[str, ...]:
        """Each tensor's first name."""
        return tuple(map(self._entries.names.__getitem__, self.indices))

    @property
    def numel(self) -> int:
        """Elements in all: an uninitialized lazy parameter has none yet."""
        return sum(p.numel() for p in self.params if not _uninitialized(type(p)))

    def __repr__(self) -> str:
        return f"Members({len(self)} tensors)"
