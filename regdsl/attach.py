"""``reg.attach(optimizers)``: what the step of each attached optimizer does.

One optimizer, or several that each step their own part of the model (a GAN's generator and
discriminator, each optimizer built from ``reg.param_groups(of=part)``). At a step of one of them:

* with ``fold=True``, the folded terms (:mod:`regdsl.fold`) of the parameters that optimizer holds
  are added to their gradients: each term once per step of the optimizer holding its parameter.
  ``penalty()`` keeps exactly the terms no optimizer folds;
* after the update, the ``prox`` and ``max_norm`` terms of the parameters it holds run (with one
  optimizer, every one of them, as ``after_step`` runs them);
* ``reg.step`` advances by one. It counts the steps of every attached optimizer, as Lightning's
  ``trainer.global_step`` does under manual optimization, and every schedule reads it; each
  scheduled ``decay`` is then written into the groups of every optimizer holding its parameters.

Several optimizers must split the model between them: a trainable parameter in two of them, or a
parameter some term acts on in none, is a :class:`RegUsageError` at ``attach``, before any hook
or group is touched.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .compiled_step import compiled_step
from .constraints import PostStepPlan
from .entries import Members, ParamEntry
from .errors import RegDslWarning, RegUsageError, caller_stacklevel
from .fold import Folding, FoldPlan
from .fold_kernels import eager
from .guards import LrRatios, check_lrs, check_maximize, warn_decay_not_in_groups, warn_decay_underflow
from .optimizer_checks import check_model, check_split, unwrapped, warn_other_folds
from .penalties import PenaltyPlan
from .replaced import unwatch, watch, watch_steps
from .resolution import GroupKey
from .schedule import any_scheduled, strength_at
from .step_hooks import FoldCalls, Orphan, step_hooks

if TYPE_CHECKING:
    from .compiler import Regularizer


def subset(of: nn.Module | Iterable[torch.Tensor], entries: Sequence[ParamEntry]) -> set[int]:
    """The ids of the tensors ``param_groups(of=...)`` builds groups for: a module's parameters, or
    the parameters given. Each must be a parameter of the compiled model."""
    try:
        # One tensor is one parameter, not the rows iterating it would give.
        tensors = list(of.parameters()) if isinstance(of, nn.Module) else [of] if isinstance(of, torch.Tensor) else list(of)
    except TypeError:
        tensors = [of]  # not iterable: refused below
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise RegUsageError("param_groups(of=...) takes a module or parameter tensors (module.parameters())")
    known = {id(e.param) for e in entries}
    strangers = sum(id(t) not in known for t in tensors)
    if strangers:
        raise RegUsageError(
            f"param_groups(of=...) was given {strangers} tensor{'s' if strangers > 1 else ''} that "
            f"{'are' if strangers > 1 else 'is'} no parameter of the model the rules were compiled against"
        )
    return {id(t) for t in tensors}


_ABSENT = object()


class DecayWriter:
    """Writes each scheduled decay's value at a step into its optimizer group: the one holding exactly
    its tensors that this optimizer steps, since a wider one would decay what the rules exclude.
    Found once per set of optimizer groups (``load_state_dict`` replaces them)."""

    def __init__(self, scheduled: Sequence[tuple[GroupKey, list[ParamEntry]]], stepped: set[int] | None = None):
        # stepped: what this optimizer holds, with several attached; None: it must hold every member.
        self._wanted = []
        for key, members in scheduled:
            ids = {id(e.param) for e in members}
            if stepped is not None:
                ids &= stepped
            if ids:
                self._wanted.append((key, ids))
        self._hint = "reg.param_groups()" if stepped is None else "reg.param_groups(of=...) of its part of the model"
        self._identity: tuple[tuple[int, int], ...] | None = None
        self._index: list[tuple[GroupKey, int]] = []

    def write(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for key, index in self.groups(optimizer):
            optimizer.param_groups[index]["weight_decay"] = strength_at(key.decay, step)

    def groups(self, optimizer: torch.optim.Optimizer) -> list[tuple[GroupKey, int]]:
        if not self._wanted:
            return []
        groups = optimizer.param_groups
        identity = tuple((id(g), id(g["params"])) for g in groups)
        if identity != self._identity:
            found = []
            for key, wanted in self._wanted:
                index = next((i for i, g in enumerate(groups) if {id(p) for p in g["params"]} == wanted), None)
                if index is None:
                    raise RegUsageError(
                        f"the optimizer has no group '{key.name}': build it from {self._hint} "
                        "so a scheduled decay can be written into it"
                    )
                found.append((key, index))
            self._index, self._identity = found, identity
        return self._index


class _Owner:
    """One attached optimizer and what its step runs; ``lost`` is told when it is garbage-collected."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        post: PostStepPlan,
        decay: DecayWriter,
        fold: FoldPlan | None,
        lost: Callable[[Any], None],
        params: set[int],
    ):
        self.optimizer = weakref.ref(optimizer, lost)
        self.post, self.decay, self.fold = post, decay, fold
        self.params = params  # the ids of the tensors it steps
        self.applies: list[str] = []  # what its hooks do that nothing else does, named for a warning
        self.gone = False
        # A plan with terms: with fold_hook=False each step checks reg.fold() ran, and each fold that it ran once.
        self.by_hand = FoldCalls(fold.params()) if fold else None
        self.activity: frozenset[int] | None = None  # with several: the activity targets its steps end (None: all)


class Attachment:
    """The optimizers a regularizer is attached to. Everything that can be refused is checked
    before the first hook is installed or the first group written."""

    def __init__(self, reg: Regularizer, optimizers: list[torch.optim.Optimizer], fold: bool, fold_hook: bool):
        for flag, value in (("fold", fold), ("fold_hook", fold_hook)):
            if not isinstance(value, bool):
                raise RegUsageError(f"attach({flag}=...) takes True or False, not {value!r}")
        several = len(optimizers) > 1
        check_maximize(optimizers, fold)
        stepped = [{id(p) for g in o.param_groups for p in g["params"]} for o in optimizers]
        for k, ids in enumerate(stepped):
            check_model(reg, ids, f"optimizer {k + 1} of {len(optimizers)}" if several else "the optimizer")
        if several:
            check_split(reg, stepped)
        checked = []
        for k, optimizer in enumerate(optimizers):
            post = PostStepPlan([i for i in reg._post_items if id(i.param) in stepped[k]]) if several else reg._post
            if post.prox:
                post.locate(optimizer.param_groups)  # every proximal parameter must be in it
            decay = DecayWriter(reg._scheduled_decays, stepped[k] if several else None)
            decay.groups(optimizer)
            checked.append((post, decay))
        folding = Folding(reg._loss_items, stepped, reg.step) if fold else None
        self._folding = folding
        self._fold_hook = fold_hook
        self._rest: PenaltyPlan | None = folding.rest if folding is not None else None
        self._step = reg.step
        self._lost: list[Any] = []  # the weak references of attached optimizers garbage-collected, not yet buried
        self._reg = weakref.ref(reg)
        # Optimizers seen stepping none of its tensors, by id, with their param_groups to tell a reused id:
        # the global hook sees every optimizer, and some are neither hashable nor weakly referable.
        self._unrelated: dict[int, Any] = {}
        self._owners = [
            _Owner(optimizer, post, decay, folding.plans[k] if folding is not None else None, self._on_lost(), stepped[k])
            for k, (optimizer, (post, decay)) in enumerate(zip(optimizers, checked))
        ]
        # The warnings read the decays as written, and may raise (warnings as errors): then the groups
        # get back what they held, and no hook is installed.
        held = [[(g, g.get("weight_decay", _ABSENT)) for g in o.param_groups] for o in optimizers]
        try:
            for owner, optimizer in zip(self._owners, optimizers):
                owner.decay.write(optimizer, reg.step)
            for optimizer in optimizers:
                warn_decay_underflow(optimizer, reg._groups)
                warn_decay_not_in_groups(optimizer, reg._groups, reg.step)
                warn_other_folds(reg, optimizer)
        except BaseException:
            for group, value in itertools.chain.from_iterable(held):
                if value is _ABSENT:
                    group.pop("weight_decay", None)
                else:
                    group["weight_decay"] = value
            raise
        self.hooks: list[Any] = []
        scheduled = bool(reg._scheduled_decays) or any_scheduled(i.term for i in reg._loss_items + reg._post_items)
        names = {key.name for key, _ in reg._groups}
        for owner, optimizer in zip(self._owners, optimizers):
            handles = step_hooks(
                weakref.ref(reg), optimizer, owner.fold if fold_hook else None, reg._busy, None if fold_hook else owner.by_hand
            )
            if LrRatios.needed(optimizer.param_groups, names):
                handles.append(optimizer.register_step_post_hook(functools.partial(eager(check_lrs), LrRatios(names))))
            self.hooks += handles
            applied = {
                "folded terms": bool(owner.fold) and fold_hook,
                "post-step terms": bool(owner.post),
                "a decay schedule": bool(owner.decay.groups(optimizer)),
            }
            applies = [what for what, on in applied.items() if on]
            if applies:
                self.hooks.append(Orphan(handles, applies))
            owner.applies = applies + ["the step count schedules read"] * scheduled
        if several:
            ends = _activity_owners(reg, stepped)
            for k, owner in enumerate(self._owners):
                owner.activity = frozenset(i for i, o in enumerate(ends) if o is None or o == k)
        if any(owner.applies for owner in self._owners):
            watch_steps()

    def _on_lost(self) -> Callable[[Any], None]:
        # The callback of an owner's weak reference: it must not hold the attachment alive.
        lost, me = self._lost, weakref.ref(self)

        def on_lost(ref: Any) -> None:
            lost.append(ref)
            attachment = me()
            if attachment is not None:
                watch(attachment)

        return on_lost

    def stepped_elsewhere(self, optimizer: torch.optim.Optimizer) -> None:
        """A step of ``optimizer`` after an optimizer attached here was garbage-collected: when it steps
        tensors the lost one's hooks applied something to, warn, once (:mod:`regdsl.replaced`)."""
        lost = [owner for owner in self._owners if owner.optimizer() is None and not owner.gone and owner.applies]
        reg = self._reg()
        if not lost or reg is None or reg._attached is not self:
            unwatch(self)  # told by penalty() already, or attached anew, detached, or gone
            return
        groups = optimizer.param_groups
        if self._unrelated.get(id(optimizer)) is groups or any(owner.optimizer() is optimizer for owner in self._owners):
            return
        ids = set().union(*(owner.params for owner in lost))
        if not any(id(p) in ids for group in groups for p in group["params"]):
            self._unrelated[id(optimizer)] = groups
            return
        unwatch(self)
        what = list(dict.fromkeys(w for owner in lost for w in owner.applies))
        warnings.warn(
            RegDslWarning(
                f"this optimizer steps parameters of a regularizer whose attached optimizer was garbage-collected, "
                f"and with it what its hooks did ({', '.join(what)}): this step does none of it. "
                "reg.attach(this_optimizer, ...) to it"
            ),
            stacklevel=caller_stacklevel(through_torch=True),
        )

    @property
    def rest(self) -> PenaltyPlan | None:
        """The loss terms ``penalty()`` holds (None: all of them, nothing is folded): those no attached
        optimizer still alive folds."""
        if self._lost:
            self._lost.clear()
            self._bury()
        return self._rest

    def holds(self) -> bool:
        """Whether any attached optimizer is still alive."""
        return any(owner.optimizer() is not None for owner in self._owners)

    def _bury(self) -> None:
        """An attached optimizer was garbage-collected (replaced by one regdsl was never attached to):
        what its hooks did stops, so its folded terms go back to ``penalty()``, and the first
        ``penalty()`` after it warns, as the step of an optimizer whose regularizer died does."""
        dead = [owner for owner in self._owners if owner.optimizer() is None and not owner.gone]
        for owner in dead:
            owner.gone = True
        returned = [item for owner in dead if owner.fold is not None for item in owner.fold.items]
        if returned and self._rest is not None:
            self._rest = PenaltyPlan(self._rest.items + returned, self._step)
        lost = list(dict.fromkeys(what for owner in dead for what in owner.applies))
        if lost:
            warnings.warn(
                RegDslWarning(
                    f"an optimizer this regularizer was attached to was garbage-collected, and with it what its "
                    f"hooks did ({', '.join(lost)}): an optimizer that replaced it does none of it. "
                    "reg.attach(new_optimizer, ...) to it"
                    + (". Until then penalty() holds the folded terms again" if returned else "")
                ),
                stacklevel=caller_stacklevel(),
            )

    def owner(self, optimizer: torch.optim.Optimizer | None) -> _Owner:
        """The attached ``optimizer``'s record; ``None`` names the only one."""
        if optimizer is None:
            if len(self._owners) > 1:
                raise RegUsageError(
                    f"{len(self._owners)} optimizers are attached: pass the one about to step, reg.fold(optimizer)"
                )
            return self._owners[0]
        optimizer = unwrapped(optimizer)
        owner = next((o for o in self._owners if o.optimizer() is optimizer), None)
        if owner is None:
            raise RegUsageError("this optimizer is not attached to the regularizer: pass one of those given to attach()")
        return owner

    def compiled_step(
        self, optimizer: torch.optim.Optimizer | None, options: dict[str, Any], reg: Regularizer
    ) -> Callable[..., Any]:
        owner = self.owner(optimizer)
        stepping = owner.optimizer()
        if owner.fold is None or stepping is None or not self._fold_hook:
            raise RegUsageError(
                "compiled_step() folds the terms in the optimizer's step: it needs attach(optimizer, fold=True)"
                + (", not fold_hook=False, which leaves them to reg.fold()" if owner.fold is not None else "")
            )
        return compiled_step(stepping, owner.fold, options, reg)

    def fold(self, optimizer: torch.optim.Optimizer | None) -> None:
        owner = self.owner(optimizer)
        stepping = owner.optimizer()
        if owner.fold is None or stepping is None:
            raise RegUsageError("fold() needs attach(optimizer, fold=True, fold_hook=False) first")
        if self._fold_hook:
            raise RegUsageError(
                "the optimizer's step folds the terms already (attach(optimizer, fold=True)): reg.fold() would add them "
                "twice; it is for attach(optimizer, fold=True, fold_hook=False)"
            )
        if owner.by_hand is not None:
            owner.by_hand.check()
        owner.fold(getattr(stepping, "grad_scale", None))
        if owner.by_hand is not None:
            owner.by_hand.done()

    def retire(self) -> None:
        """At ``detach()``: a compiled step made for these optimizers must not fold any more."""
        for owner in self._owners:
            if owner.fold is not None:
                owner.fold.retired = True

    def set_step(self, step: int) -> None:
        self._step = step
        if self._folding is not None:
            self._folding.set_step(step)
        if self._rest is not None and self._folding is not None and self._rest is not self._folding.rest:
            self._rest.set_step(step)  # the one _bury() made
        for owner in self._owners:
            optimizer = owner.optimizer()
            if optimizer is not None:
                owner.decay.write(optimizer, step)


def _activity_owners(reg: Regularizer, stepped: Sequence[set[int]]) -> list[int | None]:
    """For each activity target, the optimizer whose step ends its values' time (a network's forward is
    its own optimizer's step to take into a loss): the one stepping the parameters of the target, or of
    the nearest module around it that has any (a ReLU goes with its network). None: no one optimizer
    (the root's parameters span them all), and every step drops its values."""
    modules = reg.table.module_names
    owners: list[int | None] = []
    for target in reg._activity.targets:
        parts, found = target.name.split(".") if target.name else [], None
        for depth in range(len(parts), -1, -1):
            module = modules.get(".".join(parts[:depth]))
            ids = {id(p) for p in module.parameters()} if module is not None else set()
            holders = [k for k, s in enumerate(stepped) if ids & s]
            if holders:
                found = holders[0] if len(holders) == 1 else None
                break
        owners.append(found)
    return owners


def cut_groups(groups: list[tuple[Any, Members]], ids: set[int]) -> list[tuple[Any, Members]]:
    """``(key, members)`` groups cut down to the tensors in ``ids``, the empty ones left out."""
    cut = [(key, members.only(ids)) for key, members in groups]
    return [(key, members) for key, members in cut if members]


def optimizer_groups(
    chosen: list[tuple[GroupKey, Members]], step: int, lr_scale: bool, defaults: dict[str, Any]
) -> list[dict[str, Any]]:
    """``param_groups()``' groups: each key's decay at ``step``, its name, the defaults, and its
    ``lr_mult`` as ``lr = m · lr`` or (``lr_scale``) as timm's ``lr_scale``."""
    groups = []
    for key, members in chosen:
        group = {
            "params": members.params,
            "weight_decay": strength_at(key.decay, step) if key.decay else 0.0,
            "name": key.name,
            **defaults,
        }
        if key.lr_mult is not None:
            group["lr_mult"] = key.lr_mult
            if lr_scale:
                group["lr_scale"] = key.lr_mult
            elif "lr" in defaults:
                group["lr"] = defaults["lr"] * key.lr_mult
        groups.append(group)
    return groups
