"""Resume state: the optimizer group layout the rules produced, how a saved layout differs
from the current one, and a saved optimizer state carried over to the current layout.

torch's ``optimizer.load_state_dict`` matches saved state to parameters by position and
takes every group's hyperparameters from the saved dict. Edit a rule file between save
and resume and both go quietly wrong: moved parameters get their neighbours' moments, a
changed decay stays at the saved value. So ``reg.state_dict()`` records the layout
(``groups``), ``reg.load_state_dict`` refuses a different one, and
:func:`remap_optimizer_state` re-keys the optimizer state by parameter name instead.

A layout is plain data (a list of dicts of strings, floats and lists), so a checkpoint
never needs regdsl's classes to be unpickled.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from .errors import RegDslWarning, RegStateError, RegUsageError, caller_stacklevel, name_list, shape_text
from .resolution import GroupSummary

Layout = list[dict[str, Any]]

# Group keys the rule file owns; every other key of a group belongs to the user.
RULE_KEYS = ("weight_decay", "name", "lr_mult")
# Group keys that hold learning rates, so scale with lr_mult: the optimizer's own, and those
# LR schedulers store (initial_lr by all of them, max_lr and min_lr by OneCycleLR).
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_SETTINGS = ("weight_decay", "lr_mult", "schedule")

_HOW = (
    "To resume, carry the optimizer state over by parameter name:\n"
    "    optimizer.load_state_dict(reg.remap_optimizer_state(saved_optimizer_state, saved_reg_state))\n"
    "    reg.load_state_dict(saved_reg_state, strict=False)"
)


def saved_step(state: Mapping[str, Any]) -> int:
    if not isinstance(state, Mapping):
        raise RegUsageError(f"a regularizer's state is the mapping reg.state_dict() returns, not {type(state).__name__}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RegUsageError(f"state_dict 'step' must be a whole number >= 0, got {step!r}")
    return step


def saved_references(state: Mapping[str, Any], items: Mapping[str, tuple[Any, str]], strict: bool) -> dict[str, Any]:
    """The saved ``w0`` to load for each ``l2 ... to init|ref`` (``items``: name -> (parameter, 'init' or
    'ref')), checked before any is loaded. A reference the state lacks (a rule added since) or saved
    for the other kind ('to init' now 'to ref') raises with ``strict``; without, it keeps what
    ``compile()`` made (the given reference, or the weights at compile for 'to init'), with a warning."""
    saved = state.get("references", {})
    if not isinstance(saved, Mapping):
        raise RegUsageError(
            f"state_dict 'references' maps each parameter with a reference ({name_list(list(items))}) to a tensor, "
            f"not a {type(saved).__name__}"
        )
    kinds = state.get("reference_kinds", {})  # absent in states saved before kinds were recorded
    kinds = kinds if isinstance(kinds, Mapping) else {}
    missing = [name for name in items if name not in saved]
    changed = [name for name, (_, kind) in items.items() if name in saved and kinds.get(name, kind) != kind]
    if missing or changed:
        what = [f"{name_list(missing)} (new since)"] * bool(missing)
        what += [f"{name_list(changed)} (saved for the other of 'to init' and 'to ref')"] * bool(changed)
        problem = f"state_dict has no reference of the current rules for {' and '.join(what)}"
        if strict:
            raise RegStateError(
                f"{problem}: load with strict=False to keep the w0 compile() made for them (the reference given, "
                "or for 'to init' the weights at compile)"
            )
        warnings.warn(RegDslWarning(f"{problem}: they keep the w0 compile() made"), stacklevel=caller_stacklevel())
    for name, (param, _) in items.items():
        if name in missing or name in changed:
            continue
        if not isinstance(saved[name], torch.Tensor):  # checked before any is loaded: a refused load changes nothing
            raise RegUsageError(f"state_dict reference for '{name}' is a {type(saved[name]).__name__}, not a tensor")
        if tuple(saved[name].shape) != tuple(param.shape):
            raise RegUsageError(
                f"state_dict reference for '{name}' has shape {shape_text(tuple(saved[name].shape))}, "
                f"the parameter {shape_text(tuple(param.shape))}"
            )
        # As compile() checks a reference given to it (RD105): a NaN w0 makes every penalty NaN.
        if saved[name].is_complex() != param.is_complex() or not saved[name].is_floating_point() and not saved[name].is_complex():
            raise RegUsageError(f"state_dict reference for '{name}' is a {saved[name].dtype} tensor, the parameter {param.dtype}")
        if saved[name].is_meta and not param.is_meta:  # a state of a model built on meta: no values to load
            raise RegUsageError(f"state_dict reference for '{name}' lies on the meta device: it holds no values")
        if not saved[name].is_meta and not bool(torch.isfinite(saved[name]).all()):
            raise RegUsageError(f"state_dict reference for '{name}' holds NaN or infinite values")
    return {name: saved[name] for name in items if name not in missing and name not in changed}


def layout(groups: Sequence[GroupSummary]) -> Layout:
    """Each optimizer group as the rules make it: name, settings as written, member names in order."""
    return [
        {
            "name": g.name,
            "weight_decay": g.weight_decay,
            "lr_mult": g.lr_mult,
            "schedule": g.schedule,
            "params": list(g.params),
        }
        for g in groups
    ]


def saved_layout(state: Mapping[str, Any]) -> Layout | None:
    """The layout in a saved ``reg.state_dict()``; None when it was saved before layouts were recorded."""
    if "groups" not in state:
        return None
    groups = state["groups"]
    if not isinstance(groups, Sequence) or not all(_is_group(g) for g in groups):
        raise RegStateError("state_dict 'groups' is not a group layout saved by reg.state_dict()")
    return [
        {key: (list(g[key]) if key == "params" else g[key]) for key in ("name", *_SETTINGS, "params")} for g in groups
    ]


def cut(layout: Layout, names: set[str]) -> tuple[Layout, list[int]]:
    """The groups cut down to the parameters named in ``names``, as ``param_groups(of=...)`` cuts
    them (the empty ones left out), and the indices of the groups kept."""
    kept = [(i, {**g, "params": [n for n in g["params"] if n in names]}) for i, g in enumerate(layout)]
    kept = [(i, g) for i, g in kept if g["params"]]
    return [g for _, g in kept], [i for i, _ in kept]


def of_part(
    state: Mapping[str, Any], current: Layout, decays: Sequence[float], names: set[str]
) -> tuple[Mapping[str, Any], Layout, list[float]]:
    """The saved state, the current layout and its decays cut down to one part's parameters (``names``),
    as ``param_groups(of=...)`` cuts the groups: what ``remap_optimizer_state(..., of=part)`` remaps."""
    current, kept = cut(current, names)
    saved = saved_layout(state)
    return ({**state, "groups": cut(saved, names)[0]} if saved is not None else state), current, [decays[i] for i in kept]


def _is_group(g: Any) -> bool:
    return (
        isinstance(g, Mapping)
        and isinstance(g.get("name"), str)
        and isinstance(g.get("schedule"), str)
        and isinstance(g.get("weight_decay"), Real)
        and isinstance(g.get("lr_mult"), Real)
        and isinstance(g.get("params"), Sequence)
        and not isinstance(g["params"], str)
        and all(isinstance(n, str) for n in g["params"])
    )


def check_layout(state: Mapping[str, Any], current: Layout) -> None:
    """Raise :class:`RegStateError` if ``state`` was saved with another layout than ``current``."""
    saved = saved_layout(state)
    if saved is None:
        # Refusing would strand every checkpoint saved before layouts existed; most resume
        # with unchanged rules, so they load, with a warning that nothing could be checked.
        warnings.warn(
            RegDslWarning(
                "this state_dict was saved before regdsl recorded optimizer group layouts, so it cannot be "
                "checked against the rules: it is right only if the rule file and the model are unchanged "
                "since it was saved (reg.load_state_dict(state, strict=False) loads it without this warning)"
            ),
            stacklevel=caller_stacklevel(),
        )
        return
    changes = differences(saved, current)
    if changes:
        error = RegStateError(
            "the saved regularizer state comes from rules that group the parameters differently; loading the "
            "optimizer state as saved would give parameters another parameter's state and the old group "
            "settings. What changed:\n" + "\n".join(f"  {line}" for line in changes) + "\n" + _HOW
        )
        error.changes = tuple(changes)
        raise error


def differences(saved: Layout, current: Layout) -> list[str]:
    """What separates two layouts, one line each; empty when they are equal."""
    if saved == current:
        return []
    was, now = _where(saved), _where(current)
    # A group continues under new settings only if no current group kept its settings;
    # otherwise what went elsewhere split off, and is reported as moved.
    kept = {g["name"] for g in current}
    donors = [
        d if d is not None and (saved[d]["name"] == g["name"] or saved[d]["name"] not in kept) else None
        for g, d in zip(current, continued_from(saved, current))
    ]
    lines = []
    for group, donor in zip(current, donors):
        if donor is not None and group["name"] != saved[donor]["name"]:
            old = saved[donor]
            changed = ", ".join(
                f"{key} {_setting(old[key])} -> {_setting(group[key])}" for key in _SETTINGS if old[key] != group[key]
            )
            lines.append(f"group '{old['name']}' is now '{group['name']}'" + (f": {changed}" if changed else ""))
    moves: dict[tuple[str, str], list[str]] = {}
    for name, (index, _) in now.items():
        if name in was and was[name][0] != donors[index]:
            moves.setdefault((saved[was[name][0]]["name"], current[index]["name"]), []).append(name)
    lines += [f"{name_list(names, 5)} moved from group '{a}' to group '{b}'" for (a, b), names in moves.items()]
    new = [name for name in now if name not in was]
    gone = [name for name in was if name not in now]
    if new:
        lines.append(f"new to the groups (no saved state): {name_list(new)}")
    if gone:
        lines.append(f"no longer in any group: {name_list(gone)}")
    if not lines:
        # Same groups and members, yet torch would still pair state by position.
        shifted = [name for name in now if now[name] != was[name]]
        lines.append(f"the same groups and members in another order, at new positions: {name_list(shifted)}")
    return lines


def _setting(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _where(layout: Layout) -> dict[str, tuple[int, int]]:
    """Parameter name -> (group index, position in the group)."""
    return {name: (i, j) for i, group in enumerate(layout) for j, name in enumerate(group["params"])}


def continued_from(saved: Layout, current: Layout) -> list[int | None]:
    """For each current group, the saved group it continues: the one of the same name (the same
    settings), else the one most of its members come from (ties: the earlier), else None."""
    by_name = {g["name"]: i for i, g in enumerate(saved)}
    was = _where(saved)
    donors: list[int | None] = []
    for group in current:
        if group["name"] in by_name:
            donors.append(by_name[group["name"]])
            continue
        counts = Counter(was[n][0] for n in group["params"] if n in was)
        donors.append(min(counts, key=lambda i: (-counts[i], i)) if counts else None)
    return donors


def remap_optimizer_state(
    optimizer_state: Mapping[str, Any],
    state: Mapping[str, Any],
    current: Layout,
    weight_decays: Sequence[float],
    lr_scale: bool | None = None,
) -> dict[str, Any]:
    """``optimizer_state`` (saved with the layout in ``state``) re-keyed for the ``current`` layout.

    Each parameter keeps its own per-parameter state, found by name. Each group takes
    ``weight_decay`` (``weight_decays[i]``), ``name`` and ``lr_mult`` from the current rules
    and every other key from the saved group it continues (:func:`continued_from`; the
    first saved group for a group of parameters all new), with the learning rates in
    :data:`LR_KEYS` scaled by the ratio of the two lr_mults. ``lr_scale``: the current groups were
    built with ``param_groups(lr_scale=True)`` (None: as the saved ones were), so each keeps the base
    rate and carries ``lr_scale = lr_mult`` instead. Parameters new to the groups
    start with no state and saved parameters no longer in any group are dropped: a
    :class:`RegDslWarning` names both.
    """
    saved = saved_layout(state)
    if saved is None:
        raise RegStateError(
            "this state_dict was saved before regdsl recorded optimizer group layouts, so its optimizer state "
            "cannot be matched by name; with an unchanged rule file, load the optimizer state as it is"
        )
    groups, per_param = _saved_optimizer(optimizer_state, saved)
    by_name = {
        name: per_param[index]
        for group, layout_group in zip(groups, saved)
        for index, name in zip(group["params"], layout_group["params"])
        if index in per_param
    }
    if not saved and current:
        raise RegStateError("the saved optimizer has no parameter group to take lr and the other settings from")
    was, donors = _where(saved), continued_from(saved, current)
    scaled = lr_scale if lr_scale is not None else any("lr_scale" in g for g in groups)
    out_groups, out_state, fresh, next_id = [], {}, [], 0
    for i, group in enumerate(current):
        donor = donors[i] if donors[i] is not None else 0
        settings = {k: v for k, v in groups[donor].items() if k not in ("params", "param_names", "lr_scale", *RULE_KEYS)}
        mult = 1.0 if scaled else group["lr_mult"]
        same_scale = scaled and "lr_scale" in groups[donor] and groups[donor]["lr_scale"] == group["lr_mult"]
        if same_scale:
            found = _rates(groups[donor]), 1.0  # its rates as saved, whatever a timm scheduler wrote
        else:
            found = _base_rates(groups, saved, donor)
        if found is None and mult:
            warnings.warn(
                RegDslWarning(
                    f"remap_optimizer_state: every saved group has lr_mult 0, so the saved optimizer holds no base "
                    f"learning rate for group '{group['name']}' (lr_mult {group['lr_mult']}): it resumes with the "
                    "saved lr, 0; set its lr after loading"
                ),
                stacklevel=caller_stacklevel(),
            )
        rates, of = found if found is not None else (_rates(groups[donor]), mult)
        # A ratio, not a division then a product: an unchanged lr_mult gives the saved rates bit for bit.
        settings.update(rates if mult == of else {k: v * (mult / of) for k, v in rates.items()})
        if scaled and not same_scale and found is not None and group["lr_mult"] != 1.0 and _scheduler_scaled(groups):
            # The saved groups hold what a timm scheduler wrote, base · lr_scale: so does this one, or it would
            # run at the bare base rate beside them until the scheduler's next update (an epoch, for some).
            lr = settings.get("lr")
            if isinstance(lr, Real) and not isinstance(lr, bool):
                settings["lr"] = lr * group["lr_mult"]
        settings["weight_decay"] = weight_decays[i]
        settings["name"] = group["name"]
        if group["lr_mult"] != 1.0:  # as param_groups() writes them: no key for lr_mult 1
            settings["lr_mult"] = group["lr_mult"]
            if scaled:
                settings["lr_scale"] = group["lr_mult"]
        settings["params"] = list(range(next_id, next_id + len(group["params"])))
        for index, name in zip(settings["params"], group["params"]):
            if name in by_name:
                out_state[index] = dict(by_name[name])
            elif name not in was:
                fresh.append(name)
        next_id += len(group["params"])
        out_groups.append(settings)
    gone = [name for name in was if not any(name in group["params"] for group in current)]
    if fresh or gone:
        parts = [f"{name_list(fresh)} start with fresh optimizer state (new to the groups)"] * bool(fresh)
        parts += [f"the saved state of {name_list(gone)} is dropped (no longer in any group)"] * bool(gone)
        warnings.warn(RegDslWarning("remap_optimizer_state: " + "; ".join(parts)), stacklevel=caller_stacklevel())
    return {"state": out_state, "param_groups": out_groups}


def _base_rates(groups: Sequence[Mapping[str, Any]], saved: Layout, donor: int) -> tuple[dict[str, Any], float] | None:
    """Saved learning rates and the lr_mult they are for, read from the donor where it can tell them:
    what the base rate is at the saved point, under any LR scheduler that scales each group's lr by
    one common factor. None when no saved group can tell (every one had lr_mult 0)."""
    if any("lr_scale" in g for g in groups):
        # Built with param_groups(lr_scale=True): a group without an lr_scale holds the base rate, where
        # one with it may hold it times its scale (timm's schedulers write that).
        order = [donor, *range(len(groups))]
        unit = next((i for i in order if groups[i].get("lr_scale", 1.0) == 1.0), None)
        return (_rates(groups[unit]) if unit is not None else _unscaled(groups, donor)), 1.0
    # An 'lr_mult 0' group's rates say nothing about the base rate; another group's do.
    source = donor if saved[donor]["lr_mult"] else next((i for i, g in enumerate(saved) if g["lr_mult"]), None)
    return None if source is None else (_rates(groups[source]), saved[source]["lr_mult"])


def _unscaled(groups: Sequence[Mapping[str, Any]], donor: int) -> dict[str, Any]:
    """The donor's rates with its ``lr`` back at the base rate, when no group is at scale 1 (the deepest
    layer frozen, an lr_mult on every group). A timm scheduler writes ``lr = base · lr_scale`` into
    every group at once, and before its first step each holds the base: two groups of different
    scales tell which. With one scale only, nothing tells, and the lr is taken as it is."""
    rates, scale = _rates(groups[donor]), groups[donor].get("lr_scale", 1.0)
    lr = rates.get("lr")
    if isinstance(lr, (int, float)) and scale and _scheduler_scaled(groups):
        rates["lr"] = lr / scale
    return rates


def _scheduler_scaled(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a timm scheduler wrote ``lr = base · lr_scale`` into the saved groups: two groups of
    different scales hold different rates, in the ratio of their scales. Equal rates are the base in
    each (no scheduler had stepped); with one scale only, nothing tells (False)."""
    seen = [(g.get("lr_scale", 1.0), g["lr"]) for g in groups if isinstance(g.get("lr"), (int, float))]
    scale, lr = seen[0] if seen else (None, None)
    for theirs, their_lr in seen[1:]:
        if theirs != scale and theirs and scale:
            return their_lr != lr and math.isclose(their_lr * scale, lr * theirs, rel_tol=1e-9)
    return False


def _rates(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in LR_KEYS if k in group}


def _saved_optimizer(
    optimizer_state: Mapping[str, Any], saved: Layout
) -> tuple[list[Mapping[str, Any]], Mapping[Any, Any]]:
    """The saved optimizer's groups and per-parameter state, checked to be the saved layout's groups."""
    if not isinstance(optimizer_state, Mapping):
        raise RegStateError("remap_optimizer_state() needs an optimizer's state_dict(): 'state' and 'param_groups'")
    groups, per_param = optimizer_state.get("param_groups"), optimizer_state.get("state")
    if (
        not isinstance(groups, Sequence)
        or not isinstance(per_param, Mapping)
        or not all(isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in groups)
        or not all(isinstance(v, Mapping) for v in per_param.values())  # each parameter's own state: a dict
    ):
        raise RegStateError("remap_optimizer_state() needs an optimizer's state_dict(): 'state' and 'param_groups'")
    # A group without a 'name' key (an optimizer not built by param_groups()) is checked on its size alone.
    found = [(g.get("name", layout_group["name"]), len(g["params"])) for g, layout_group in zip(groups, saved)]
    if len(groups) != len(saved) or found != [(g["name"], len(g["params"])) for g in saved]:
        raise RegStateError(
            f"the optimizer state's groups ({_sizes(groups)}) are not those of the saved layout ({_sizes(saved)}): "
            "save both from the same run, with the optimizer built from reg.param_groups()"
        )
    return list(groups), per_param


def _sizes(groups: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"'{g.get('name', '?')}': {len(g['params'])}" for g in groups) or "none"
