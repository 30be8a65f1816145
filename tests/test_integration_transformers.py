"""regdsl.integrations.transformers: a tiny GPT-2 trained by RegularizedTrainer gives the weights
of a plain loop written here (the same global batches, SGD, constant lr, no clipping), for
gradient accumulation 1, 2 and 4, on the fold path and the loss path (SGD: Adam's first steps
would turn rounding differences in near-zero gradients into whole steps); a resumed run continues
its schedules; per-term values reach Trainer's logs; optimizers with their own groups are refused.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from torch.utils.data import Dataset, SequentialSampler

import regdsl
from regdsl import RegUsageError
from regdsl.integrations.transformers import STATE_FILE, RegularizedTrainer

GLOBAL_BATCH, STEPS, LR, SEQ = 8, 4, 0.1, 12
# A warmup makes the step counter matter (a resume that lost it would differ), and the activity
# term is per micro-batch: both are where the accumulation factor could go wrong.
RULES = """\
all decay 0.01
exclude bias
exclude norm
exclude embedding
layer transformer.h.*.mlp.c_fc.weight l1 1e-3 warmup 3
layer transformer.h.*.attn.c_attn.weight group_lasso 1e-2 dim=1
layer transformer.h.0.mlp activity l2 1e-2
"""


class Tokens(Dataset):
    def __init__(self, n: int = GLOBAL_BATCH * STEPS):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=SEQ, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # no dropout: Trainer draws its own random numbers
    model = transformers.GPT2LMHeadModel(config)
    # Built from a config, the model has no loss_type, and Trainer then counts num_items_in_batch
    # over unshifted labels (12 tokens a row where the loss averages 11): set what from_pretrained sets.
    model.loss_type = "ForCausalLM"
    return model


class InOrder(RegularizedTrainer):
    """The test's only change to Trainer: batches in dataset order, so a plain loop can follow."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def arguments(tmp_path, accumulate: int, **extra) -> transformers.TrainingArguments:
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": GLOBAL_BATCH // accumulate,
        "gradient_accumulation_steps": accumulate, "max_steps": STEPS, "learning_rate": LR, "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0, "weight_decay": 0.0, "optim": "sgd", "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0,
    }  # fmt: skip
    return transformers.TrainingArguments(**{**settings, **extra})


def trained(tmp_path, accumulate: int, fold: bool = True, **extra) -> tuple[RegularizedTrainer, dict[str, torch.Tensor]]:
    trainer = InOrder(model=gpt2(), args=arguments(tmp_path, accumulate, **extra), train_dataset=Tokens(), rules=regdsl.parse(RULES), fold=fold)
    trainer.train()
    return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def plain_loop() -> dict[str, torch.Tensor]:
    """What the Trainer runs must equal: whole global batches, the data loss plus reg.penalty()."""
    model = gpt2()
    model.train()
    reg = regdsl.compile(regdsl.parse(RULES), model)
    opt = torch.optim.SGD(reg.param_groups(lr=LR))
    reg.attach(opt)
    data = Tokens()
    for step in range(STEPS):
        ids = data.ids[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
        loss = model(input_ids=ids, labels=ids).loss + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    weights = plain_loop()
    before = dict(gpt2().named_parameters())
    assert all(not torch.equal(before[n], w) for n, w in weights.items())  # every tensor moved
    return weights


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "loss"])
@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_trainer_matches_the_plain_loop(tmp_path, expected, accumulate: int, fold: bool) -> None:
    trainer, weights = trained(tmp_path, accumulate, fold=fold)
    assert trainer.model_accepts_loss_kwargs  # GPT-2 normalizes by num_items_in_batch: Trainer does not divide
    assert trainer.reg.step == STEPS
    assert_same(weights, expected)


def test_a_loss_trainer_divides_gets_the_penalty_whole(tmp_path, expected) -> None:
    """The other case: Trainer divides the loss by the accumulation steps itself."""
    trainer = InOrder(model=gpt2(), args=arguments(tmp_path, 2), train_dataset=Tokens(), rules=regdsl.parse(RULES), fold=False)
    trainer.model_accepts_loss_kwargs = False  # as for a model whose forward takes no loss kwargs
    trainer.train()
    # Without num_items_in_batch each micro-batch's loss is its own mean; with equal micro-batches
    # their average is the global batch's mean, so the plain loop's weights hold here too.
    assert_same({n: p.detach() for n, p in trainer.model.named_parameters()}, expected)


def test_resume_continues_the_schedules(tmp_path, expected) -> None:
    first = InOrder(model=gpt2(), args=arguments(tmp_path / "a", 2, save_strategy="steps", save_steps=2), train_dataset=Tokens(), rules=regdsl.parse(RULES))
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert torch.load(checkpoint / STATE_FILE, weights_only=True)["step"] == 2
    resumed = InOrder(model=gpt2(), args=arguments(tmp_path / "b", 2), train_dataset=Tokens(), rules=regdsl.parse(RULES))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.reg.step == STEPS
    assert_same({n: p.detach() for n, p in resumed.model.named_parameters()}, expected)


def test_per_term_values_are_logged(tmp_path) -> None:
    trainer, _ = trained(tmp_path, 2)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS
    lines = {i + 1 for i, line in enumerate(RULES.splitlines()) if "l1" in line or "group_lasso" in line or "activity" in line}
    for entry in logged:
        labels = {k for k in entry if k.startswith("reg/")}
        assert labels == {f"reg/l1:{min(lines)}", f"reg/group_lasso:{min(lines) + 1}", f"reg/activity_l2:{min(lines) + 2}"}, labels
        assert entry[f"reg/group_lasso:{min(lines) + 1}"] > 0
    assert logged[0][f"reg/l1:{min(lines)}"] < logged[-1][f"reg/l1:{min(lines)}"]  # the warmup: 0 at step 0


def test_model_init_recompiles_for_each_model(tmp_path) -> None:
    built = []

    def model_init():
        built.append(gpt2())
        return built[-1]

    trainer = InOrder(model_init=model_init, args=arguments(tmp_path, 1), train_dataset=Tokens(), rules=regdsl.parse(RULES))
    trainer.train()
    first = trainer.reg
    trainer.train()
    assert trainer.reg is not first and len(built) >= 2
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in trainer.model.parameters() if p.requires_grad}


def test_optimizers_with_their_own_groups_are_refused(tmp_path) -> None:
    layerwise = (torch.optim.AdamW, {"lr": LR, "optimizer_dict": {}})
    trainer = InOrder(model=gpt2(), args=arguments(tmp_path, 1), train_dataset=Tokens(), rules=regdsl.parse(RULES), optimizer_cls_and_kwargs=layerwise)
    with pytest.raises(RegUsageError, match="builds its own parameter groups"):
        trainer.train()
    with pytest.raises(RegUsageError, match="optimizer_cls_and_kwargs"):
        InOrder(model=gpt2(), args=arguments(tmp_path, 1), train_dataset=Tokens(), rules=regdsl.parse(RULES), optimizers=(torch.optim.SGD(gpt2().parameters(), lr=0.1), None))
    # A scheduler alone was built on another optimizer: it would schedule that one, and Trainer would
    # log its rates, while the optimizer regdsl builds trains at a constant rate.
    other = torch.optim.SGD(gpt2().parameters(), lr=0.1)
    with pytest.raises(RegUsageError, match=r"optimizers=\(None, scheduler\).*create_scheduler"):
        InOrder(model=gpt2(), args=arguments(tmp_path, 1), train_dataset=Tokens(), rules=regdsl.parse(RULES), optimizers=(None, torch.optim.lr_scheduler.LambdaLR(other, lambda s: 0.0)))


def test_weight_decay_in_the_arguments_warns(tmp_path) -> None:
    args = arguments(tmp_path, 1)
    args.weight_decay = 0.1
    trainer = InOrder(model=gpt2(), args=args, train_dataset=Tokens(), rules=regdsl.parse(RULES))
    with pytest.warns(regdsl.RegDslWarning, match="weight_decay=0.1 is ignored"):
        trainer.create_optimizer()


def test_weight_decay_in_the_optimizer_kwargs_warns(tmp_path) -> None:
    # Before, it was dropped in silence: decay 0.3 asked for, the rule file's 0.01 applied.
    kwargs = (torch.optim.AdamW, {"lr": LR, "weight_decay": 0.3})
    trainer = InOrder(model=gpt2(), args=arguments(tmp_path, 1), train_dataset=Tokens(), rules=regdsl.parse(RULES), optimizer_cls_and_kwargs=kwargs)
    with pytest.warns(regdsl.RegDslWarning, match=r"optimizer_cls_and_kwargs's weight_decay=0.3 is ignored"):
        trainer.create_optimizer()
    assert sorted({g["weight_decay"] for g in trainer.optimizer.param_groups}) == [0.0, 0.01]


def test_a_resume_with_edited_rules_is_refused_by_regdsl_before_the_optimizer_is_touched(tmp_path) -> None:
    # Before, the optimizer state was loaded first: torch's "different number of parameter groups"
    # (or, when only a decay changed, the refusal came after the optimizer was overwritten).
    first = InOrder(model=gpt2(), args=arguments(tmp_path / "a", 1, save_strategy="steps", save_steps=2), train_dataset=Tokens(), rules=regdsl.parse(RULES))
    first.train()
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    for edited in (RULES.replace("exclude embedding\n", ""), RULES.replace("all decay 0.01", "all decay 0.02")):
        resumed = InOrder(model=gpt2(), args=arguments(tmp_path / "b", 1), train_dataset=Tokens(), rules=regdsl.parse(edited))
        resumed.create_optimizer()
        before = {k: v for k, v in resumed.optimizer.state_dict().items() if k != "state"}
        with pytest.raises(regdsl.RegStateError) as info:
            resumed._load_optimizer_and_scheduler(checkpoint)
        assert {k: v for k, v in resumed.optimizer.state_dict().items() if k != "state"} == before
        assert not resumed.optimizer.state
        # What a Trainer user can do: not the plain loop's remap, which Trainer gives no place to call.
        message = str(info.value)
        assert "Trainer does not remap" in message and "What changed:\n  " in message, message
        assert "resume with the rule file it was written with" in message.lower() and "remap_optimizer_state" not in message


def test_hyperparameter_search_compiles_for_each_trial(tmp_path) -> None:
    """Optuna's trials rebuild the model through model_init; each gets its own regularizer, whose
    groups hold exactly that model's parameters."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen = []

    class Tracked(InOrder):
        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            stepped = {id(p) for g in opt.param_groups for p in g["params"]}
            seen.append((self.model, self.reg, stepped == {id(p) for p in self.model.parameters()}))
            return opt

    trainer = Tracked(
        model_init=lambda trial=None: gpt2(), args=arguments(tmp_path, 2), train_dataset=Tokens(),
        eval_dataset=Tokens(GLOBAL_BATCH), rules=regdsl.parse(RULES),
    )  # fmt: skip
    space = lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 0.01, 0.1, log=True)}
    best = trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=2, hp_space=space)
    assert 0.01 <= best.hyperparameters["learning_rate"] <= 0.1
    assert len(seen) == 2 and seen[0][0] is not seen[1][0] and seen[0][1] is not seen[1][1]
    assert all(matched for _, _, matched in seen)
    assert all(reg.step == STEPS for _, reg, _ in seen)


def test_hyperparameter_search_gives_the_rule_files_search_spaces_their_values(tmp_path) -> None:
    """The rule file's spaces are suggested by the same Optuna trial as Trainer's own hp_space, and
    the best run's hyperparameters make the winning file."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rules = regdsl.parse("all l2 loguniform(1e-4, 1e-1) as lam\nexclude bias\nexclude norm\n")
    used = []

    class Tracked(InOrder):
        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            used.append((self._trial.params["lam"], self.reg.strength("transformer.h.0.mlp.c_fc.weight", "l2")))
            return opt

    trainer = Tracked(
        model_init=lambda trial=None: gpt2(), args=arguments(tmp_path, 2), train_dataset=Tokens(),
        eval_dataset=Tokens(GLOBAL_BATCH), rules=rules,
    )  # fmt: skip
    space = lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 0.01, 0.1, log=True)}
    best = trainer.hyperparameter_search(direction="minimize", backend="optuna", n_trials=2, hp_space=space)
    assert len(used) == 2 and all(suggested == strength for suggested, strength in used)
    assert 1e-4 <= best.hyperparameters["lam"] <= 1e-1
    won = rules.with_values({name: best.hyperparameters[name] for name in rules.spaces()})
    assert won.to_source() == f"all l2 {best.hyperparameters['lam']!r}\nexclude bias\nexclude norm\n"


def test_a_dict_trial_gives_values_by_name(tmp_path) -> None:
    # Backends other than Optuna hand Trainer a dict of values; the spaces' names are looked up in it.
    trainer = InOrder(
        model=gpt2(), args=arguments(tmp_path, 1), train_dataset=Tokens(),
        rules=regdsl.parse("all l2 uniform(0, 1) as lam\n"),
    )  # fmt: skip
    trainer._trial = {"lam": 0.25, "learning_rate": 0.1}
    trainer.create_optimizer()
    assert trainer.reg.strength("transformer.h.0.mlp.c_fc.weight", "l2") == 0.25
    trainer.optimizer = None
    trainer._trial = None
    with pytest.raises(regdsl.RegCompileError, match="'lam'.*has no value"):
        trainer.create_optimizer()  # outside a search a space has no value: compile says which


def test_a_plain_trainers_checkpoint_is_refused_before_the_optimizer_is_touched(tmp_path) -> None:
    # Before, it loaded with a warning about schedules, and its two groups (Trainer's decay and no-decay,
    # weight_decay 0.0 here) replaced the rule file's by position: decay 0.01 gone for the rest of the run.
    plain = transformers.Trainer(model=gpt2(), args=arguments(tmp_path / "a", 1, save_strategy="steps", save_steps=2), train_dataset=Tokens())
    plain.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    resumed = InOrder(model=gpt2(), args=arguments(tmp_path / "b", 1), train_dataset=Tokens(), rules=regdsl.parse(RULES))
    resumed.create_optimizer()
    before = {k: v for k, v in resumed.optimizer.state_dict().items() if k != "state"}
    with pytest.raises(regdsl.RegStateError, match=rf"{STATE_FILE}.*resume_from_checkpoint"):
        resumed._load_optimizer_and_scheduler(str(checkpoint))
    assert {k: v for k, v in resumed.optimizer.state_dict().items() if k != "state"} == before
    assert not resumed.optimizer.state
    # Without an optimizer state there is nothing to misplace: the schedules restart, as the warning says.
    (checkpoint / "optimizer.pt").unlink()
    with pytest.warns(regdsl.RegDslWarning, match="every schedule restarts at step 0"):
        resumed._load_optimizer_and_scheduler(str(checkpoint))
