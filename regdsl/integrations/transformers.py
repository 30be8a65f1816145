"""Hugging Face ``Trainer`` with a rule file: ``RegularizedTrainer(rules="rules.reg", ...)``.

What it does (docs/integrations/transformers.md):

* builds the optimizer from ``optimizer_cls_and_kwargs`` (or ``args.optim`` through
  ``Trainer.get_optimizer_cls_and_kwargs``) with regdsl's parameter groups, compiling the rules
  against the model Trainer is about to train: again for every ``model_init`` trial;
* attaches the regularizer to that optimizer, folding the parameter terms into its step by
  default (``fold=True``), so that they apply once per optimizer step whatever the gradient
  accumulation;
* adds ``reg.penalty()`` (activity terms, and every term with ``fold=False``) to the training
  loss with the factor Trainer's own accumulation scaling needs, in each case it has: a loss
  Trainer divides by the accumulation steps, or one already normalized over them (a model that
  accepts ``num_items_in_batch``, a ``compute_loss_func``, ``loss_is_scaled_for_ga``);
* saves ``reg.state_dict()`` in each checkpoint beside the optimizer and loads it on resume;
* logs each term's value as ``reg/<term>:<line>`` with Trainer's training logs.

Optimizers that build their own parameter groups (GaLore, LOMO, layer-wise, optimizer
factories) are refused with :class:`regdsl.RegUsageError`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from ..build import load
from ..compiler import Regularizer, compile
from ..errors import RegDslWarning, RegStateError, RegUsageError
from ..spec import Spec

STATE_FILE = "regdsl.pt"
# Keys of get_optimizer_cls_and_kwargs' kwargs that replace the parameter groups.
_OWN_GROUPS = ("params", "model", "optimizer_dict")


class RegularizationMixin:
    """Mix into your own ``Trainer`` subclass, before ``Trainer``: ``class T(RegularizationMixin, MyTrainer)``."""

    def __init__(
        self,
        *args: Any,
        rules: Spec | str | os.PathLike[str],
        reference: Mapping[str, torch.Tensor] | None = None,
        fold: bool = True,
        **kwargs: Any,
    ):
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers and optimizers[0] is not None:
            raise RegUsageError(
                "RegularizedTrainer builds the optimizer from the rule file's groups: pass "
                "optimizer_cls_and_kwargs=(cls, kwargs) or TrainingArguments(optim=...) instead of optimizers=(optimizer, ...)"
            )
        if optimizers and len(optimizers) > 1 and optimizers[1] is not None:
            # It was built on another optimizer: it would schedule that one (and Trainer log its rates).
            raise RegUsageError(
                "optimizers=(None, scheduler): the scheduler was built on an optimizer that does not train, since "
                "RegularizedTrainer builds its own from the rule file's groups in create_optimizer(). Choose one with "
                "TrainingArguments(lr_scheduler_type=...), or build it on the optimizer Trainer passes to "
                "create_scheduler(num_training_steps, optimizer) in a subclass"
            )
        self.rules, self.reference, self.fold = rules, reference, fold
        self.reg: Regularizer | None = None
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------ optimizer

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        own = [key for key in _OWN_GROUPS if key in optimizer_kwargs]
        if own or _is_factory(optimizer_cls):
            raise RegUsageError(
                f"the optimizer {getattr(optimizer_cls, '__name__', optimizer_cls)!s} (optim={self.args.optim!s}) builds its "
                "own parameter groups (GaLore, LOMO, layer-wise and factory optimizers do), so the rule file's groups "
                "cannot be given to it: choose an optimizer that takes parameter groups, such as adamw_torch"
            )
        given = [("TrainingArguments.weight_decay", self.args.weight_decay)]
        if self.optimizer_cls_and_kwargs is not None:
            given.append(("optimizer_cls_and_kwargs's weight_decay", optimizer_kwargs.get("weight_decay")))
        for where, value in given:
            if value:
                warnings.warn(
                    RegDslWarning(
                        f"{where}={value} is ignored: the rule file sets each group's decay "
                        "(write 'all decay VALUE' for a default)"
                    ),
                    stacklevel=2,
                )
        if self.reg is not None:
            self.reg.detach()  # a model_init trial: the previous model's regularizer lets go of its hooks
        rules, trial = self._rules_for_trial()
        self.reg = compile(rules, opt_model, reference=self.reference, trial=trial)
        defaults = {k: v for k, v in optimizer_kwargs.items() if k != "weight_decay"}
        lr = defaults.pop("lr", self.args.learning_rate)
        self.optimizer = optimizer_cls(self.reg.param_groups(lr=lr, **defaults))
        self.reg.attach(self.optimizer, fold=self.fold)
        return self.optimizer

    def _rules_for_trial(self) -> tuple[Any, Any]:
        """In a ``hyperparameter_search``, the rule file's search spaces take their values from the
        trial: Optuna's trial itself (``trial.suggest_*`` under each space's name), or the dict of
        values other backends pass (the spaces' names among its keys)."""
        trial = getattr(self, "_trial", None)
        if isinstance(trial, Mapping):
            spec = self.rules if isinstance(self.rules, Spec) else load(self.rules)
            return spec.with_values({name: trial[name] for name in spec.spaces() if name in trial}), None
        return self.rules, trial if hasattr(trial, "suggest_float") else None

    # ------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.reg is None or not (model.training and torch.is_grad_enabled()):
            return result  # evaluation: the data loss alone
        loss, outputs = result if return_outputs else (result, None)
        penalty = self.reg.penalty()
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # Trainer will not divide this loss by the accumulation steps: the penalty must be.
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Trainer.training_step's own test of whether it divides the loss by the accumulation steps."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None)

    # ------------------------------------------------------------ checkpoints and logs

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.reg is not None and self.args.should_save:
            torch.save(self.reg.state_dict(), os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # regdsl's state first (docs/resume.md): a rule file edited since the checkpoint is refused with
        # what moved, before the optimizer's state is touched (torch would only say the groups differ).
        if checkpoint is not None and self.reg is not None:
            path = os.path.join(checkpoint, STATE_FILE)
            if os.path.isfile(path):
                try:
                    self.reg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                except RegStateError as error:
                    if not error.changes:
                        raise
                    # The remap recipe the message ends with needs a loop of one's own: Trainer loads the state.
                    raise RegStateError(
                        f"{checkpoint} was written with rules that group the parameters differently, and Trainer "
                        "does not remap an optimizer state onto edited rules. What changed:\n"
                        + "\n".join(f"  {line}" for line in error.changes)
                        + "\nResume with the rule file it was written with, or start from its weights "
                        "(from_pretrained(checkpoint), then train() without resume_from_checkpoint)"
                    ) from None
            elif _has_optimizer_state(checkpoint):
                raise RegStateError(
                    f"{checkpoint} has no {STATE_FILE}: a Trainer without regdsl wrote it, so its optimizer state is "
                    "laid out in other parameter groups, which torch would load by position over the rule file's "
                    "(their weight_decay and learning rates replaced by the checkpoint's, moments handed to other "
                    "tensors). Start from its weights instead (from_pretrained(checkpoint), then train() without "
                    "resume_from_checkpoint), or delete its optimizer.pt to resume with a fresh optimizer"
                )
            else:
                warnings.warn(
                    RegDslWarning(f"{checkpoint} has no {STATE_FILE}: every schedule restarts at step 0"), stacklevel=2
                )
        super()._load_optimizer_and_scheduler(checkpoint)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.reg is not None and "loss" in logs:
            logs = {**logs, **{f"reg/{label}": value.item() for label, value in self.reg.values().items()}}
        super().log(logs, *args, **kwargs)


def _has_optimizer_state(checkpoint: str) -> bool:
    """Whether Trainer would load an optimizer state from ``checkpoint``: it loads one only beside a
    scheduler's (``optimizer.pt``, or a sharded one's file or folder, and ``scheduler.pt``)."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    if not os.path.isfile(os.path.join(checkpoint, SCHEDULER_NAME)):
        return False
    return any(name.startswith(OPTIMIZER_NAME.split(".")[0]) for name in os.listdir(checkpoint))


class RegularizedTrainer(RegularizationMixin, Trainer):
    """``transformers.Trainer`` that takes ``rules=`` (a ``.reg`` path or a :class:`regdsl.Spec`),
    plus ``reference=`` for ``l2 ... to ref`` and ``fold=`` (default True)."""


def _is_factory(optimizer_cls: Any) -> bool:
    try:
        from transformers.trainer import is_optimizer_factory  # type: ignore[attr-defined]
    except ImportError:  # a transformers without optimizer factories
        return False
    return bool(is_optimizer_factory(optimizer_cls))


__all__ = ["STATE_FILE", "RegularizationMixin", "RegularizedTrainer"]
