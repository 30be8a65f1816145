"""Lightning with a rule file: ``Trainer(callbacks=[RegularizationCallback("rules.reg")])``.

The callback (docs/integrations/lightning.md):

* compiles the rules against the LightningModule in ``setup``, before ``configure_optimizers``
  runs, and sets ``pl_module.reg`` so that ``configure_optimizers`` can build its optimizer from
  ``self.reg.param_groups(lr=...)``;
* attaches the regularizer to every optimizer Lightning built (several under manual optimization,
  each from ``self.reg.param_groups(of=part, ...)``) and, by default, folds the parameter terms
  of the optimizer about to step in ``on_before_optimizer_step`` (after the closure's backward,
  before gradient clipping; manual optimization's ``opt.step()`` runs it too; not into a step with
  no backward since the optimizer's last, a ``training_step`` that returned None), so that
  ``training_step`` changes only where the file has activity terms (or with ``fold=False``):
  there it adds ``self.reg.penalty()`` to its loss. Lightning divides that loss by
  ``accumulate_grad_batches`` itself, and steps (and folds) once per accumulation;
* logs each term's value as ``reg/<term>:<line>`` through ``pl_module.log``, every
  ``log_every_n_steps`` of ``trainer.global_step`` (computing them reads every regularized weight);
* saves ``reg.state_dict()`` in Lightning's checkpoints and restores it on resume.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from ..compiler import Regularizer, compile
from ..errors import RegUsageError
from ..spec import Spec


class RegularizationCallback(pl.Callback):
    """``rules``: a ``.reg`` path or a :class:`regdsl.Spec`, written for the LightningModule's own
    parameter names (``model.fc1.weight`` for a module kept as ``self.model``). ``trial``: an
    Optuna trial, for rules with search spaces (``regdsl.compile(..., trial=)``)."""

    def __init__(
        self,
        rules: Spec | str | os.PathLike[str],
        reference: Mapping[str, torch.Tensor] | None = None,
        fold: bool = True,
        log: bool = True,
        trial: Any = None,
    ):
        self.rules, self.reference, self.fold, self.log = rules, reference, fold, log
        self.trial = trial  # an Optuna trial: it gives the rules' search spaces their values
        self.reg: Regularizer | None = None
        self._saved: Mapping[str, Any] | None = None  # a checkpoint's state, loaded before setup compiled
        # Backward passes so far, and their count at each optimizer's last step: a step with no backward
        # since (a training_step that returned None) updates nothing, so nothing is folded into it either.
        self._backwards = 0
        self._seen: dict[int, int] = {}
        self._compiled_for: tuple[int, tuple[int, ...]] | None = None  # the module and parameters self.reg is for

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test/predict alone: self.reg for a step that reads it (values()), attached to nothing.
            if self.reg is None or self._compiled_for != (id(pl_module), _parameter_ids(pl_module)):
                self.reg = compile(self.rules, pl_module, reference=self.reference, trial=self.trial)
                self._compiled_for = (id(pl_module), _parameter_ids(pl_module))
            pl_module.reg = self.reg
            return
        if self.reg is not None and self._compiled_for == (id(pl_module), _parameter_ids(pl_module)):
            # A second fit of the same module continues: reg.step goes on as trainer.global_step does,
            # and 'to init' keeps the weights the first fit started from.
            pl_module.reg = self.reg
            return
        if self.reg is not None:
            self.reg.detach()
        self.reg = compile(self.rules, pl_module, reference=self.reference, trial=self.trial)
        self._compiled_for = (id(pl_module), _parameter_ids(pl_module))
        pl_module.reg = self.reg
        if self._saved is not None:
            self.reg.load_state_dict(self._saved)
            self._saved = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.reg is not None
        # Lightning runs forward and backward inside optimizer.step(closure) (manual optimization
        # too, with an empty closure), after any step pre-hook: the terms are folded in
        # on_before_optimizer_step, once the gradients exist. reg.step counts every optimizer's
        # steps, as trainer.global_step does.
        for optimizer in trainer.optimizers if self.fold else ():
            if getattr(optimizer, "defaults", {}).get("line_search_fn") is not None:
                # It evaluates the closure's loss, which never holds the folded terms their gradients add.
                raise RegUsageError(
                    f"{type(optimizer).__name__} with a line search (line_search_fn="
                    f"{optimizer.defaults['line_search_fn']!r}) compares the closure's losses, which hold no folded "
                    "term: RegularizationCallback(..., fold=False) puts every term in the loss (self.reg.penalty())"
                )
        self.reg.attach(trainer.optimizers, fold=self.fold, fold_hook=False)
        self._backwards, self._seen = 0, {}  # this fit's optimizers: none has stepped yet

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._backwards += 1

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        backward, self._seen[id(optimizer)] = self._seen.get(id(optimizer), 0) != self._backwards, self._backwards
        if not (self.fold and self.reg is not None and backward):
            return
        scale = _scale_to_come(trainer, optimizer)
        if scale is None:
            self.reg.fold(optimizer)
            return
        # Set as GradScaler.step() will set it for the update, so the fold scales its terms to match.
        optimizer.grad_scale = scale
        try:
            self.reg.fold(optimizer)
        finally:
            del optimizer.grad_scale

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # values() reads every regularized weight: only on the steps the Trainer logs.
        if self.log and self.reg is not None and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            values = self.reg.values()
            if values:
                pl_module.log_dict({f"reg/{label}": value for label, value in values.items()}, on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.reg is not None:
            self.reg.detach()  # the hooks go; pl_module.reg stays for inspection

    def state_dict(self) -> dict[str, Any]:
        return {"reg": self.reg.state_dict()} if self.reg is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("reg")
        if saved is None:
            return
        if self.reg is None:
            self._saved = saved
        else:
            self.reg.load_state_dict(saved)


def _parameter_ids(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(id(p) for p in module.parameters())


def _scale_to_come(trainer: pl.Trainer, optimizer: Any) -> torch.Tensor | None:
    """The loss scale of gradients still scaled at ``on_before_optimizer_step``: a fused optimizer
    unscales them itself, so Lightning's mixed precision skips ``unscale_`` and runs this hook before
    ``scaler.step()``, which sets ``optimizer.grad_scale`` only for the update. None otherwise."""
    if getattr(optimizer, "grad_scale", None) is not None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._get_scale_async()  # the scale tensor, on the device, read without a host sync


__all__ = ["RegularizationCallback"]
