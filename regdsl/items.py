"""Resolution -> what the runtime works on at each step: a :class:`~regdsl.penalties.LossItem` per
loss term and parameter, a :class:`~regdsl.constraints.PostStepItem` per ``prox`` and ``max_norm``,
an :class:`~regdsl.activity.ActivityTarget` per activity term and module.

Most of a large model gets nothing per step (``decay`` and ``lr_mult`` live in the optimizer's
groups), so the entries are visited by outcome: what one entry of an outcome needs, all of them
need, and only the entries of outcomes that need something are looked at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .activity import ActivityTarget
from .constraints import PostStepItem
from .errors import RegCompileError, model_diagnostic
from .penalties import LossItem
from .references import find_reference, reference_index
from .resolution import Resolution, Setting
from .schedule import always_zero
from .select import ParamEntry
from .spec import kind_label


def step_items(
    resolution: Resolution, reference: Mapping[str, torch.Tensor] | None
) -> tuple[list[LossItem], list[PostStepItem], dict[str, LossItem], list[ActivityTarget]]:
    """The loss items, the post-step items, the loss items with a ``w₀`` by parameter name, and the
    activity targets. Diagnostics have passed: a ``to ref`` rule comes with a mapping that holds
    every reference it needs (RD105)."""
    index = reference_index(reference) if isinstance(reference, Mapping) else {}
    loss: list[LossItem] = []
    post: list[PostStepItem] = []
    anchored: dict[str, LossItem] = {}
    todo = {k: t for k, i in resolution.representatives().items() if (t := _per_step_terms(resolution.terms_of(i)))}
    outcomes, table = resolution.outcome_of(), resolution.table
    # Read from the table's columns: only an 'l2 ... to' makes its tensor's entry (regdsl.entries).
    params, names, trainable = table.params, table.names, table.trainable
    for i in resolution.entries_with(set(todo)):
        if not trainable[i]:
            continue
        for kind, term in todo[outcomes[i]]:
            if kind in ("prox", "max_norm"):
                post.append(PostStepItem(kind, names[i], params[i], term))
                continue
            w0 = _reference(table.entries[i], term, index) if kind == "l2" and getattr(term, "to", None) else None
            item = LossItem(kind, params[i], term, w0)
            if item.reference is not None:
                anchored[names[i]] = item
            loss.append(item)
    modules = resolution.table.modules_by_name if resolution.modules else {}
    targets = [
        ActivityTarget(row.name, modules[row.name], setting.term, _bad_output(resolution, setting))
        for row in resolution.modules
        for setting in row.terms.values()
        if not always_zero(setting.term)
    ]
    return loss, post, anchored, targets


def _per_step_terms(terms: Mapping[str, Setting]) -> list[tuple[str, Any]]:
    """What a parameter with these terms needs at each step: loss terms by kind, then 'prox'
    and 'max_norm' (post-step). A term that is 0 at every step needs nothing, not even a reference."""
    todo: list[tuple[str, Any]] = []
    for kind in ("l1", "l2", "group_lasso", "orthogonal"):
        setting = terms.get(kind)
        if setting is not None and not always_zero(setting.term):
            todo.append(("prox" if kind == "l1" and setting.term.prox else kind, setting.term))
    if "max_norm" in terms:
        todo.append(("max_norm", terms["max_norm"].term))
    return todo


def _reference(entry: ParamEntry, term: Any, index: dict[str, Any]) -> torch.Tensor | None:
    if target := getattr(term, "to", None):
        hit = find_reference(entry, index)
        source = entry.param if target == "init" else hit[1] if hit is not None else None
        assert source is not None  # reference_problems() has refused a missing one
        # A copy in the source's own precision (a float64 pretrained state stays float64).
        return source.detach().to(device=entry.param.device, copy=True)
    return None


def _bad_output(resolution: Resolution, setting: Setting) -> Any:
    """What an activity hook raises when its module returns no single tensor (RD106)."""
    spec = resolution.spec

    def error(name: str, type_name: str) -> RegCompileError:
        kind = kind_label(setting.term.kind)
        return RegCompileError(
            [
                model_diagnostic(
                    spec, setting.pos, "RD106",
                    f"'{kind}' needs a floating-point tensor output, but module '{name or '(model)'}' returned a "
                    f"{type_name}; select a submodule whose output is one such tensor",
                )
            ]
        )  # fmt: skip

    return error
