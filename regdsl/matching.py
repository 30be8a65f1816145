"""Selectors against a whole :class:`~regdsl.select.ParamTable` at once.

What :func:`regdsl.select.atom_matches` says of one entry, this says of all of
them, with each distinct question asked once: a glob against each name (never
against each of a name's prefixes), a class pattern against each class, ``bias``
against each attribute name, and a selector written on many lines of a file
only the first time. Answers are tuples of entry indices in table order, and the
same selector always gets the very same tuple, so later passes can cache on it.
"""

from __future__ import annotations

import bisect
import functools
import re
import weakref
from collections.abc import Callable
from itertools import compress
from typing import Any

from torch.nn.utils import parametrize

from .classes import class_of, is_bias_name, is_embedding_class, is_norm_class, type_names
from .glob import glob_regex, glob_source

Indices = tuple[int, ...]


def atom_key(atom: Any) -> tuple[Any, ...]:
    """What an atom means, cheap to hash: positions and Pydantic's machinery left out."""
    patterns = getattr(atom, "patterns", None)
    return (atom.kind, tuple(p.text for p in patterns)) if patterns else (atom.kind,)


def selector_key(selector: Any) -> tuple[Any, ...]:
    return tuple(atom_key(a) for a in selector.atoms)


@functools.lru_cache(maxsize=4096)
def prefix_regex(text: str) -> re.Pattern[str]:
    """Matches a name when the glob matches the name or one of its dotted prefixes (a module holding it):
    one match per name instead of one per prefix."""
    return re.compile(f"(?:{glob_source(text)})(?:\\..*)?", re.DOTALL)


def literal_prefix(text: str) -> str:
    """The glob up to its first wildcard: every name it matches starts with this. A ``**`` segment
    may stand for no segment at all, taking its dot with it: ``a.**`` matches ``a``, so its prefix is ``a``."""
    for k, c in enumerate(text):
        if c in "*?[{":
            if text.startswith("**", k) and k > 0 and text[k - 1] == ".":
                return text[: k - 1]
            return text[:k]
    return text


class Glob:
    """A glob read as a literal head and a wildcard tail, so that a file of thousands of globs that
    differ only in their literal part (``blocks.7.attn.*``) compiles one regex per distinct tail
    (``*``), and finds its candidates by the head in a sorted index.

    ``form`` is ``exact`` (no wildcard: the path ``head``), ``tree`` (a literal followed only by
    ``**``: ``head`` and every path under it), ``split`` (``head`` is the leading literal segments
    with their dot, ``tail`` the rest, starting with a wildcard segment other than ``**``) or
    ``whole`` (nothing to split; ``head`` is :func:`literal_prefix`).
    """

    __slots__ = ("form", "head", "tail", "text")

    def __init__(self, text: str):
        self.text = text
        segments = text.split(".")
        k = 0
        while k < len(segments) and not any(c in segments[k] for c in "*?[{"):
            k += 1
        rest = segments[k:]
        if not rest:
            self.form, self.head, self.tail = "exact", text, ""
        elif k and all(s == "**" for s in rest):
            self.form, self.head, self.tail = "tree", ".".join(segments[:k]), ""
        elif k and rest[0] != "**":
            # The glob's regex is the head's literal segments, '\.', then the tail's own regex.
            self.form, self.head, self.tail = "split", ".".join(segments[:k]) + ".", ".".join(rest)
        else:
            self.form, self.head, self.tail = "whole", literal_prefix(text), text

    def under(self, name: str) -> bool:
        """The layer reading: the glob matches the name or a dotted prefix of it (a module holding it)."""
        head = self.head
        if self.form == "split":
            return name.startswith(head) and prefix_regex(self.tail).fullmatch(name, len(head)) is not None
        if self.form == "whole":
            return prefix_regex(self.text).fullmatch(name) is not None
        return name.startswith(head) and (len(name) == len(head) or name[len(head)] == ".")

    def names(self, name: str) -> bool:
        """The glob matches the name itself (module names, for activity terms)."""
        head = self.head
        if self.form == "exact":
            return name == head
        if self.form == "tree":
            return name.startswith(head) and (len(name) == len(head) or name[len(head)] == ".")
        if self.form == "split":
            return name.startswith(head) and glob_regex(self.tail).fullmatch(name, len(head)) is not None
        return glob_regex(self.text).fullmatch(name) is not None


glob_of = functools.lru_cache(maxsize=65536)(Glob)


class Sorted:
    """Strings and a number for each, sorted, to find those that start with a given text without a scan."""

    def __init__(self, keys: list[str], values: list[int]):
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.keys = [keys[k] for k in order]
        self.values = [values[k] for k in order]

    def starting(self, prefix: str) -> zip[tuple[str, int]]:
        keys = self.keys
        lo = hi = bisect.bisect_left(keys, prefix)
        while hi < len(keys) and keys[hi].startswith(prefix):
            hi += 1
        return zip(keys[lo:hi], self.values[lo:hi])


# A sorted index costs a sort of every name; a scan, one regex call per name. The first few
# patterns of a file are scanned, the rest looked up: small files never build the index, and a
# file of 50,000 distinct patterns pays for one sort instead of 50,000 scans.
_SCANS_BEFORE_INDEX = 16


def _union(parts: list[Indices]) -> Indices:
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else ()
    return tuple(sorted(set().union(*parts)))


def _intersection(parts: list[Indices], every: Indices, as_set: Callable[[Indices], frozenset[int]]) -> Indices:
    parts = [p for p in parts if p is not every]  # 'all' narrows nothing
    if len(parts) <= 1:
        return parts[0] if parts else every
    parts.sort(key=len)
    # The smallest part, filtered by the others as sets: each atom's set is made once per table,
    # so a 'type Linear' beside a different layer on every line is not rebuilt on every line.
    others = [as_set(p) for p in parts[1:]]
    return tuple(i for i in parts[0] if all(i in other for other in others))


class Matcher:
    """The cached selection of one table: parameters by selector, modules by selector (activity terms)."""

    def __init__(self, table: Any):
        # The table holds its matcher: a strong reference back would make every table a cycle, which
        # only the garbage collector can free, and it then walks all of a big model's objects.
        self._table = weakref.ref(table)
        self.every: Indices = tuple(range(len(table.entries)))
        self.trainable_flags: list[bool] = table.trainable
        self._selectors: dict[tuple[Any, ...], Indices] = {}
        self._trainable: dict[tuple[Any, ...], Indices] = {}
        self._atoms: dict[tuple[Any, ...], Indices] = {}
        self._layers: dict[str, Indices] = {}
        self._module_selectors: dict[tuple[Any, ...], Indices] = {}
        self._module_atoms: dict[tuple[Any, ...], Indices] = {}
        self._type_hits: dict[tuple[str, str], bool] = {}
        self._sets: dict[int, tuple[Indices, frozenset[int]]] = {}

    @property
    def table(self) -> Any:
        return self._table()

    def _as_set(self, indices: Indices) -> frozenset[int]:
        # Keyed by identity: an atom's answer is one tuple, kept alive by the caches that hold it.
        found = self._sets.get(id(indices))
        if found is None or found[0] is not indices:
            found = self._sets[id(indices)] = (indices, frozenset(indices))
        return found[1]

    # ------------------------------------------------------------ parameters

    def params(self, selector: Any, key: tuple[Any, ...] | None = None) -> Indices:
        """Entries every atom of ``selector`` matches, frozen ones too."""
        key = key or selector_key(selector)
        hit = self._selectors.get(key)
        if hit is None:
            hit = self._selectors[key] = _intersection([self.atom(a) for a in selector.atoms], self.every, self._as_set)
        return hit

    def trainable(self, selector: Any, key: tuple[Any, ...] | None = None) -> Indices:
        """:meth:`params`, trainable entries only."""
        key = key or selector_key(selector)
        hit = self._trainable.get(key)
        if hit is None:
            matched = self.params(selector, key)
            flags = self.trainable_flags
            kept = tuple(compress(matched, map(flags.__getitem__, matched)))
            hit = self._trainable[key] = matched if len(kept) == len(matched) else kept
        return hit

    def atom(self, atom: Any) -> Indices:
        key = atom_key(atom)
        hit = self._atoms.get(key)
        if hit is None:
            hit = self._atoms[key] = self._atom(atom)
        return hit

    def _atom(self, atom: Any) -> Indices:
        kind = atom.kind
        if kind == "all":
            return self.every
        if kind == "layer":
            return _union([self.layer(p.text) for p in atom.patterns])
        if kind == "type":
            regexes = [glob_regex(p.text) for p in atom.patterns]
            holds = lambda types, _: any(
                r.fullmatch(n) for t in types for n in type_names(class_of(t)) for r in regexes
            )
        elif kind == "bias":
            holds = lambda _, attributes: any(is_bias_name(a) for a in attributes)
        elif kind == "norm":
            holds = lambda types, _: any(is_norm_class(t) for t in types)
        elif kind == "embedding":
            holds = lambda types, _: any(is_embedding_class(t) for t in types)
        else:  # pragma: no cover - the spec admits no other atom
            raise AssertionError(f"unhandled atom {atom!r}")
        groups = [members for (types, attributes), members in self.table.kinds.items() if holds(types, attributes)]
        if len(groups) == 1:
            return tuple(groups[0])
        # Each group is in table order and they are disjoint: sorting their runs is a merge.
        return tuple(sorted(i for members in groups for i in members))

    def layer(self, text: str) -> Indices:
        """Entries with a name (or the tensor it is an original of) under or at a path the glob matches."""
        hit = self._layers.get(text)
        if hit is not None:
            return hit
        glob = glob_of(text)
        if glob.head and len(self._layers) >= _SCANS_BEFORE_INDEX:
            # Only names that start with the glob's literal part can match: a range of the sorted names.
            under = glob.under
            hit = tuple(sorted({i for name, i in self._sorted.starting(glob.head) if under(name)}))
        else:
            matches = prefix_regex(text).fullmatch
            names, extra = self._subjects
            scanned = list(compress(self.every, map(matches, names)))
            more = {i for i, subject in extra if matches(subject)}
            hit = tuple(sorted(more.union(scanned))) if more else tuple(scanned)
        self._layers[text] = hit
        return hit

    @functools.cached_property
    def _subjects(self) -> tuple[list[str], list[tuple[int, str]]]:
        # Each entry's first name; then its other names and tensors, for the few tied or parametrized ones.
        entries = self.table.entries
        unusual = map(entries.__getitem__, self.table.unusual)
        extra = [(e.index, subject) for e in unusual for subject in sorted({*e.names, *e.tensors} - {e.name})]
        return self.table.names, extra

    @property
    def names(self) -> list[str]:
        """Each entry's first name, in table order."""
        return self._subjects[0]

    @functools.cached_property
    def _sorted(self) -> Sorted:
        names, extra = self._subjects
        return Sorted(names + [subject for _, subject in extra], [*self.every, *(i for i, _ in extra)])

    # ------------------------------------------------------------ what the model holds at all

    @functools.cached_property
    def all_paths(self) -> list[str]:
        """Every name and module path of a parameter, sorted: what a layer pattern could have meant."""
        return sorted({p for e in self.table.entries for p in e.paths})

    @functools.cached_property
    def all_classes(self) -> list[str]:
        """Every class name of every module, base classes included, sorted."""
        kinds = {type(m) for m in self.table.module_names.values()}
        return sorted({n for t in kinds for n in type_names(class_of(t))})

    @functools.cached_property
    def owner_classes(self) -> frozenset[str]:
        """Class names of the modules that own parameters directly."""
        return frozenset(n for types, _ in self.table.kinds for t in types for n in type_names(class_of(t)))

    @functools.cached_property
    def module_classes(self) -> list[str]:
        """Class names of the modules activity terms can select, sorted."""
        kinds = {type(m) for _, m in self.table.modules}
        return sorted({n for t in kinds for n in type_names(class_of(t))})

    def type_hits(self, text: str, where: str) -> bool:
        """Whether a type pattern matches some class of the model (``where="all"``), some owner's
        (``"owners"``) or some class activity terms can select (``"modules"``)."""
        key = (text, where)
        hit = self._type_hits.get(key)
        if hit is None:
            regex = glob_regex(text)
            names = {"all": self.all_classes, "owners": self.owner_classes, "modules": self.module_classes}[where]
            hit = self._type_hits[key] = any(regex.fullmatch(n) for n in names)
        return hit

    def module_layer_hits(self, text: str) -> bool:
        """Whether a layer pattern names some module activity terms can select."""
        return bool(self._module_atom_of("layer", (text,)))

    # ------------------------------------------------------------ modules (activity terms)

    def modules(self, selector: Any, key: tuple[Any, ...] | None = None) -> Indices:
        """Indices into ``table.modules`` of the modules every atom holds for, read as in
        :func:`regdsl.select.module_matches`."""
        key = key or selector_key(selector)
        hit = self._module_selectors.get(key)
        if hit is None:
            parts = [self._module_atom(a) for a in selector.atoms]
            hit = self._module_selectors[key] = _intersection(parts, self._every_module, self._as_set)
        return hit

    @functools.cached_property
    def _every_module(self) -> Indices:
        return tuple(range(len(self.table.modules)))

    @functools.cached_property
    def module_names(self) -> list[str]:
        """Names of the modules activity terms can select, each by every name it is registered under:
        what an unmatched pattern could have meant, since either name selects it."""
        return self._sorted_modules.keys

    def _module_atom(self, atom: Any) -> Indices:
        key = atom_key(atom)
        return self._module_atom_of(key[0], key[1] if len(key) > 1 else ())

    def _module_atom_of(self, kind: str, texts: tuple[str, ...]) -> Indices:
        key = (kind, texts)
        hit = self._module_atoms.get(key)
        if hit is not None:
            return hit
        modules = self.table.modules
        if kind == "all":
            hit = tuple(i for i, (_, m) in enumerate(modules) if _is_leaf(m))
        elif kind == "layer":
            hit = _union([self._module_layer(text) for text in texts])
        elif kind == "bias":
            hit = ()  # bias names a parameter, never a module
        else:
            holds = functools.cache(lambda cls: _module_class_holds(kind, texts, cls))
            hit = tuple(i for i, (_, m) in enumerate(modules) if holds(type(m)))
        self._module_atoms[key] = hit
        return hit

    def _module_layer(self, text: str) -> Indices:
        glob = glob_of(text)
        index = self._sorted_modules
        found = index.starting(glob.head) if glob.head else zip(index.keys, index.values)
        return tuple(sorted({i for name, i in found if glob.names(name)}))

    @functools.cached_property
    def _sorted_modules(self) -> Sorted:
        # Activity terms are few next to the parameters; their modules are indexed at once, each under
        # every name it is registered by (a module used twice is matched by either, as its parameters are).
        position = {id(m): i for i, (_, m) in enumerate(self.table.modules)}
        named = [(name, position[id(m)]) for name, m in self.table.module_names.items() if id(m) in position]
        return Sorted([name for name, _ in named], [i for _, i in named])

    def modules_named(self, text: str) -> list[str]:
        """Every module name (wrapped ones as themselves, the root left out) the glob matches."""
        glob = glob_of(text)
        index = self._sorted_all_modules
        found = index.starting(glob.head) if glob.head else zip(index.keys, index.values)
        return [name for _, name in sorted((i, name) for name, i in found if name and glob.names(name))]

    @functools.cached_property
    def _sorted_all_modules(self) -> Sorted:
        names = list(self.table.module_names)
        return Sorted(names, list(range(len(names))))


def _is_leaf(module: Any) -> bool:
    """``all`` as activity terms read it: no submodules, a parametrized tensor's machinery aside."""
    names = {name for name, child in module._modules.items() if child is not None}
    if not names:
        return True
    return names == {"parametrizations"} and parametrize.is_parametrized(module)


def _module_class_holds(kind: str, texts: tuple[str, ...], cls: type) -> bool:
    if kind == "type":
        regexes = [glob_regex(text) for text in texts]
        return any(r.fullmatch(n) for n in type_names(class_of(cls)) for r in regexes)
    if kind == "norm":
        return is_norm_class(cls)
    return is_embedding_class(cls)
