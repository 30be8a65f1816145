"""Pictures of what the rules did to the weights: ``regdsl plot`` and :func:`weights`.

One figure, from a rule file, a model (for names and groups; its own values are not read)
and checkpoints taken during training (``pip install regdsl[plot]`` for matplotlib):

* per optimizer group (the file's rule groups), a histogram of the weights in the first and
  the last checkpoint, counts on a log scale: what users look at to judge a λ;
* per tensor with ``l1 ... prox`` or ``group_lasso``, the fraction of exact zeros, first and
  last checkpoint (the sparsity those terms are for);
* with two or more checkpoints, each group's L2 norm from checkpoint to checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .build import load
from .resolution import resolve
from .spec import Spec
from .walk import canonical_name

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike[str]


class PlotError(Exception):
    """A checkpoint that cannot be read or lacks a tensor the rules' groups name, or an image
    file that cannot be written."""


def weights(
    rules: Spec | str | os.PathLike[str],
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    path: str | os.PathLike[str] | None = None,
    labels: Sequence[str] | None = None,
) -> Any:
    """The figure (a ``matplotlib.figure.Figure``), also written to ``path`` when given.

    ``checkpoints``: state_dicts, or files holding one (``torch.save(model.state_dict())``, or a
    dict with it under ``"model"`` or ``"state_dict"``), in training order. ``labels`` name them
    in the legends (default: "before"/"after" for two, else their index). Checkpoints load with
    ``torch.load(weights_only=True)``: tensors and plain data only. ``path``'s extension names the
    image format (``.png``, ``.pdf``, ``.svg``...); the file written is ``path`` itself.
    """
    from matplotlib.figure import Figure

    if not checkpoints:
        raise PlotError("give at least one checkpoint")
    image = None if path is None else output_format(path)
    spec = rules if isinstance(rules, Spec) else load(rules)
    resolution = resolve(spec, model)
    states = [_state(c) for c in checkpoints]
    names = list(labels) if labels is not None else _default_labels(len(states))
    groups = [(g.name, g.params) for g in resolution.groups_summary() if g.params]
    sparse = [r.name for r in resolution.rows if r.trainable and _sparsifies(r.terms)]
    shapes = {e.name: tuple(e.param.shape) for e in resolution.table.entries}
    for i, state in enumerate(states):  # every tensor drawn, checked before anything is drawn
        for name in dict.fromkeys([*(n for _, members in groups for n in members), *sparse]):  # in file order
            _check(state, name, shapes[name], checkpoints[i])
    values = [{name: _flat(state, members) for name, members in groups} for state in states]

    rows = 1 + bool(sparse) + (len(states) > 1)
    columns = max(len(groups), 1)
    fig = Figure(figsize=(max(4.0 * columns, 8.0), 3.2 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, columns)
    for column, (name, members) in enumerate(groups):
        panel = fig.add_subplot(grid[0, column])
        _histograms(panel, name, len(members), values[0][name], values[-1][name], names, image in _OPAQUE)
    row = 1
    if sparse:
        _sparsity(fig.add_subplot(grid[row, :]), sparse, states[0], states[-1], names)
        row += 1
    if len(states) > 1:
        _norms(fig.add_subplot(grid[row, :]), [g for g, _ in groups], values, names)
    if image in _OPAQUE:  # the legends' frames too: half-transparent by default
        for legend in filter(None, (ax.get_legend() for ax in fig.axes)):
            legend.get_frame().set_alpha(1.0)
    if path is not None:
        try:
            fig.savefig(path, dpi=100, format=image)
        except OSError as exc:  # after output_format's checks: no permission, a full disk
            raise PlotError(f"cannot write {os.fspath(path)}: {exc.strerror or exc}") from None
        except RuntimeError as exc:  # a backend's tool missing: .pgf needs xelatex
            raise PlotError(f"cannot write {os.fspath(path)}: {exc}") from None
    return fig


def output_format(path: str | os.PathLike[str]) -> str:
    """The image format ``path``'s extension names, checked before any work (the command line calls
    it before building the model): matplotlib finds out only when saving, and for a name with no
    extension writes ``name.png`` instead, next to a directory of that name too."""
    from matplotlib.backend_bases import FigureCanvasBase

    name = os.fspath(path)
    if os.path.isdir(name):
        raise PlotError(f"cannot write {name}: it is a directory")
    folder = os.path.dirname(name)
    if folder and not os.path.isdir(folder):
        raise PlotError(f"cannot write {name}: no directory {folder}")
    image = os.path.splitext(name)[1][1:].lower()  # matplotlib lower-cases it too
    formats = FigureCanvasBase.get_supported_filetypes()
    if image not in formats:
        why = f"matplotlib writes no format '.{image}'; end the name" if image else "the name has no extension to tell the image format; end it"
        raise PlotError(f"cannot write {name}: {why} with one of: {', '.join(sorted(formats))}")
    return image


# PostScript has no transparency: matplotlib warns and draws the second histogram over the first.
_OPAQUE = ("eps", "ps")


def _histograms(
    ax: Any, name: str, tensors: int, first: torch.Tensor, last: torch.Tensor, labels: list[str], opaque: bool
) -> None:
    ax.set_title(f"{name} ({tensors} tensor{'' if tensors == 1 else 's'})", fontsize=9)
    if not first.numel():  # zero-element tensors only (nn.Linear(0, n)): nothing to count
        ax.text(0.5, 0.5, "no elements", ha="center", va="center", transform=ax.transAxes)
        return
    low = min(first.min().item(), last.min().item())
    high = max(first.max().item(), last.max().item())
    bins = torch.linspace(low, high if high > low else low + 1e-12, 61).tolist()
    style: dict[str, Any] = {"histtype": "step", "linewidth": 1.2} if opaque else {"alpha": 0.5}
    ax.hist(first.numpy(), bins=bins, log=True, label=labels[0], color="tab:blue", **style)
    if len(labels) > 1:
        ax.hist(last.numpy(), bins=bins, log=True, label=labels[-1], color="tab:orange", **style)
    ax.set_xlabel("weight")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=8)


def _sparsity(ax: Any, tensors: list[str], first: Mapping[str, torch.Tensor], last: Mapping[str, torch.Tensor], labels: list[str]) -> None:
    x = torch.arange(len(tensors)).float()
    width = 0.4 if len(labels) > 1 else 0.8
    before = [_zeros(_tensor(first, n)) for n in tensors]
    ax.bar((x - width / 2 if len(labels) > 1 else x).numpy(), before, width, label=labels[0], color="tab:blue")
    if len(labels) > 1:
        after = [_zeros(_tensor(last, n)) for n in tensors]
        ax.bar((x + width / 2).numpy(), after, width, label=labels[-1], color="tab:orange")
    ax.set_xticks(x.numpy(), tensors, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact zeros")
    ax.set_title("sparsity of the tensors with l1 ... prox or group_lasso", fontsize=9)
    ax.legend(fontsize=8)


def _norms(ax: Any, groups: list[str], values: list[dict[str, torch.Tensor]], labels: list[str]) -> None:
    steps = list(range(len(values)))
    for name in groups:
        ax.plot(steps, [v[name].norm().item() for v in values], marker="o", label=name)
    ax.set_xticks(steps, labels, fontsize=8)
    ax.set_ylabel("L2 norm")
    ax.set_title("each group's norm, checkpoint to checkpoint", fontsize=9)
    ax.legend(fontsize=8)


def _sparsifies(terms: Mapping[str, Any]) -> bool:
    l1 = terms.get("l1")
    return "group_lasso" in terms or (l1 is not None and bool(getattr(l1.term, "prox", False)))


def _zeros(t: torch.Tensor) -> float:
    return (t == 0).float().mean().item() if t.numel() else 0.0


def _default_labels(n: int) -> list[str]:
    return ["before", "after"] if n == 2 else ["checkpoint 0"] if n == 1 else [str(i) for i in range(n)]


def _state(source: Checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state: Any = source
    else:
        state = _load(source)
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise PlotError(f"checkpoint {_describe(source)} holds no state_dict")
    return {canonical_name(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load(source: str | os.PathLike[str]) -> Any:
    """The file's contents, loaded with ``weights_only=True``; never as a full pickle, which can run
    any code the file holds (a checkpoint from elsewhere is no safer than a script from there)."""
    where = f"cannot read checkpoint {os.fspath(source)}"
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise PlotError(f"{where}: {exc.strerror or exc}") from None
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise PlotError(f"{where}: not a file torch.save wrote ({_first_line(exc)})") from None
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        what = found.group(1) if found else "objects other than tensors and plain data"
        raise PlotError(
            f"{where}: it holds {what}; checkpoints load with torch.load(weights_only=True) only, "
            "as loading other objects can run code from the file. Save the state_dict alone "
            "(torch.save(model.state_dict(), path)), or, for a file you trust, load it yourself "
            "and pass the state_dict to regdsl.plot.weights"
        ) from None
    except EOFError:
        raise PlotError(f"{where}: {'the file is empty' if _empty(source) else 'the file ends early'}") from None
    except KeyError:  # the legacy format's magic number, not found
        raise PlotError(f"{where}: not a file torch.save wrote") from None
    except Exception as exc:  # noqa: BLE001 - weights_only runs no code from the file: any failure is in reading it
        raise PlotError(f"{where}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().split("\n")[0] or type(exc).__name__


def _empty(source: str | os.PathLike[str]) -> bool:
    try:
        return os.path.getsize(source) == 0
    except OSError:
        return False


def _check(state: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], source: Checkpoint) -> None:
    """A tensor the figure draws: the model's shape (a checkpoint of another model drew a believable,
    wrong picture), real and finite (a histogram has no bin for NaN, a complex value's imaginary part)."""
    if name not in state:
        raise PlotError(f"checkpoint {_describe(source)} has no tensor '{name}'")
    value, where = state[name], f"checkpoint {_describe(source)}'s '{name}'"
    if tuple(value.shape) != shape:
        raise PlotError(f"{where} has shape {_shape(value.shape)}, the model's {_shape(shape)}: a checkpoint of another model?")
    if value.is_complex() or not (value.is_floating_point() or value.is_meta):
        raise PlotError(f"{where} is a {value.dtype} tensor: the figure draws real weights")
    if not value.is_meta and not bool(torch.isfinite(value).all()):
        raise PlotError(f"{where} holds NaN or infinite values: no histogram shows them (did training diverge?)")


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "()"


def _tensor(state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    # Present and drawable: _check saw every tensor the figure reads first.
    return state[name].detach().float().flatten()


def _flat(state: Mapping[str, torch.Tensor], members: Sequence[str]) -> torch.Tensor:
    return torch.cat([_tensor(state, name) for name in members])


def _describe(source: Checkpoint) -> str:
    return "(a mapping)" if isinstance(source, Mapping) else os.fspath(source)


__all__ = ["PlotError", "weights"]
