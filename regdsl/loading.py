"""Build a model from a command-line target: ``package.module:callable`` or ``path/to/file.py:callable``.

The model is built on the ``meta`` device when its constructor allows it, so
checking a billion-parameter model allocates no weights; if construction on
meta fails, it is built again on the CPU.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn


class ModelLoadError(Exception):
    """The target could not be resolved, called, or did not return an ``nn.Module``."""


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are Python literals (``3``, ``0.1``, ``True``, ``'x'``), else plain strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"--model-arg expects KEY=VALUE with KEY a Python identifier, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def resolve_target(target: str) -> Callable[..., Any]:
    module_part, sep, attr = target.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelLoadError(f"--model expects 'package.module:callable' or 'path/to/file.py:callable', got {target!r}")
    directory = None
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module, directory = _import_file(Path(module_part))
    else:
        # As `python -m` does, the working directory is importable (a console script's is not).
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_part)
        except (Exception, SystemExit) as exc:
            raise ModelLoadError(f"cannot import {module_part!r}: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelLoadError(f"{module_part!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ModelLoadError(f"{target!r} is not callable")
    return obj if directory is None else _called_importable(obj, directory)


def _called_importable(fn: Callable[..., Any], directory: str) -> Callable[..., Any]:
    """``fn``, with the file's directory importable while it runs too: a factory that imports its
    neighbours inside (``def make(): from helper import Block``) finds them, as in a script."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _importable(directory):
            return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def _importable(directory: str) -> Iterator[None]:
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        sys.path.remove(directory)


def _import_file(path: Path) -> tuple[Any, str]:
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}")
    name = f"_regdsl_model_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - only for non-.py paths
        raise ModelLoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own directory is importable, as when it is run as a script.
    directory = str(path.resolve().parent)
    try:
        with _importable(directory):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise ModelLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module, directory


def load_model(target: str, kwargs: dict[str, Any] | None = None, *, meta: bool = True) -> nn.Module:
    """Call the target (with ``kwargs``) and return the module it builds, on meta when possible."""
    import torch

    factory = resolve_target(target)
    kwargs = kwargs or {}
    model: Any = None
    if meta:
        try:
            with torch.device("meta"):
                model = factory(**kwargs)
        except (Exception, SystemExit):  # noqa: BLE001 - any failure on meta means: build it for real below
            model = None
    if model is None:
        try:
            model = factory(**kwargs)
        except (Exception, SystemExit) as exc:
            raise ModelLoadError(f"calling {target} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model
