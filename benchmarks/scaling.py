"""Do compile, parse and check scale? Ratios measured side by side, in one run (issue 9, point 6).

    python benchmarks/scaling.py [--quick] [--repeats N] [--compile-only]

Three questions, each a ratio against the floor it cannot beat, measured in interleaved rounds
(benchmarks/timing.py):

  compile  regdsl.compile of a 3-rule file on a model of 10,000 Linear(4, 4) (20,000 tensors),
           against list(model.named_parameters()) on the same model.     target: at most 2x
  parse    regdsl.parse of a 50,000-line rule file (parse and validate), against the LALR parse
           of lark itself (regdsl.parser's Lark instance, its .parse(text)).  target: at most 3x
           regdsl.parse pauses the garbage collector; a second line compares it with lark under
           the same pause, so the ratio of the work itself is shown too.
  check    `regdsl check FILE --model ...` on that 50,000-line file (in-process, regdsl.cli.main),
           against `regdsl check FILE` without a model.                    target: at most 3x
           The model (`blocks`) is a stack of 2,000 transformer-like blocks, 24,004 tensors, built
           on meta as the command line builds any model (its construction is part of the time);
           the file has 24 lines (25 statements) per block after a few global rules, and draws
           real diagnostics (overridden rules, decay stacked on l2).

--quick runs the same three at a fifth of the sizes, in under a minute; --compile-only, the
first alone (seconds). Only the ratios are meant to be compared, and only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

import regdsl
from regdsl.cli import main as cli
from regdsl.loading import load_model
from regdsl.parser import _lark

# The compile question's rules: a default, an exclude, and one layer glob that selects a ninth of the model.
RULES = "all decay 0.05\nexclude bias\nlayer layers.1*.** l1 1e-5\n"


class Stack(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])


def stack(layers: int) -> nn.Module:
    """``layers`` Linear(4, 4): built on meta and given (uninitialized) CPU storage, so building is fast."""
    with torch.device("meta"):
        model = Stack(layers)
    return model.to_empty(device="cpu")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width)})
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict({"fc": nn.Linear(width, 4 * width), "proj": nn.Linear(4 * width, width)})


class Blocks(nn.Module):
    def __init__(self, blocks: int, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(100, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 100, bias=False)


def blocks(blocks: int = 2000) -> nn.Module:
    """The check question's model; the command line builds it on meta, as it does any model."""
    return Blocks(blocks)


# Per block: a layer-wise learning rate, terms per sublayer, and rules a later line overrides.
PER_BLOCK = [
    "layer blocks.{i}.** lr_mult {mult}",
    "layer blocks.{i}.attn.qkv, blocks.{i}.attn.proj decay 0.01",
    "layer blocks.{i}.attn.* l1 1e-6",
    "layer blocks.{i}.mlp.fc l1 1e-5 warmup 100",
    "layer blocks.{i}.mlp.proj l2 1e-4 to init",
    "layer blocks.{i}.ln_* decay 0",
    'layer "blocks.{i}.attn.qkv" max_norm 3.0',
    "layer blocks.{i}.mlp.*.weight group_lasso 1e-4 dim=1 from 10 until 1000",
    "layer blocks.{i}.mlp.fc decay 0.02 cosine to 0.002 over 5000",
    "layer blocks.{i}.attn.proj l2 1e-5",
    "layer blocks.{i}.mlp.proj.weight orthogonal 1e-4",
    "layer blocks.{i}.ln_1 l2 1e-3  # overridden below",
    "layer blocks.{i}.ln_1, blocks.{i}.ln_2 l2 1e-4",
    "layer blocks.{i}.attn.qkv.bias decay 0; layer blocks.{i}.attn.qkv.weight decay 0.03",
    "layer blocks.{i}.mlp.** type Linear l1 1e-6 prox",
    "layer blocks.{i}.*.proj lr_mult {mult}",
    "layer blocks.{i}.mlp.fc.bias none",
    "layer blocks.{i}.attn.qkv.weight group_lasso 1e-5 dim=0",
    "layer blocks.{i}.mlp.fc.weight max_norm 4.0 dim=1",
    "layer blocks.{i}.ln_2.weight decay 0.001 until 2000",
    "layer blocks.{i}.attn.proj.weight l1 1e-7 from 50",
    "layer blocks.{i}.mlp.proj.bias l2 1e-6",
    "layer blocks.{i}.ln_1.bias lr_mult 0.5",
    "layer blocks.{i}.attn.** type Linear decay 0.015",
]
GLOBAL = ["all decay 0.05", "exclude embedding", "norm decay 0", "layer head decay 0.1", "type LayerNorm l2 1e-5"]


def rule_file(lines: int, n_blocks: int) -> str:
    """``lines`` lines: the global rules, then PER_BLOCK for each block in turn (cycling back to
    block 0 if lines remain, so those repeats override the first round)."""
    out = list(GLOBAL)
    k = 0
    while len(out) < lines:
        i = (k // len(PER_BLOCK)) % n_blocks
        out.append(PER_BLOCK[k % len(PER_BLOCK)].format(i=i, mult=round(0.9 ** (i % 50), 4)))
        k += 1
    return "\n".join(out) + "\n"


def quiet(fn):
    """``fn`` with stdout swallowed and RegDslWarnings ignored: the answer is timed, not printed."""

    def run() -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            fn()

    return run


def report(name: str, ratio: float, target: float, detail: str) -> None:
    verdict = "meets" if ratio <= target else "MISSES"
    print(f"{name:8s} {ratio:6.2f}x  (target <= {target:g}x: {verdict})  {detail}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a fifth of the sizes, under a minute")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile-only", action="store_true", help="the compile question alone")
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    cpu = torch.device("cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing import machine, timed_together

    print(machine(cpu))

    # ---------------------------------------------------------------- compile
    layers = 10_000 // scale
    model = stack(layers)
    spec = regdsl.parse(RULES)
    tensors = sum(1 for _ in model.parameters())
    t_np, t_compile = timed_together(
        [lambda: list(model.named_parameters()), quiet(lambda: regdsl.compile(spec, model))],
        cpu, args.repeats or (15 if args.quick else 21),
    )
    report(
        "compile", t_compile / t_np, 2,
        f"{tensors:,} tensors: compile {t_compile * 1e3:.1f} ms, named_parameters {t_np * 1e3:.1f} ms",
    )
    if args.compile_only:
        return

    # ---------------------------------------------------------------- parse
    lines = 50_000 // scale
    n_blocks = 2_000 // scale
    text = rule_file(lines, n_blocks)
    lark = _lark()

    def lark_paused() -> None:
        from regdsl.gcpause import paused_gc

        with paused_gc():
            lark.parse(text)

    # One warm-up call each: a parse of a whole file warms everything there is to warm.
    t_lark, t_lark_paused, t_parse = timed_together(
        [lambda: lark.parse(text), lark_paused, lambda: regdsl.parse(text)], cpu, args.repeats or 3, warmup=1
    )
    report("parse", t_parse / t_lark, 3, f"{lines:,} lines: parse {t_parse:.2f} s, lark {t_lark:.2f} s")
    print(f"{'':8s} {t_parse / t_lark_paused:6.2f}x  against lark with the collector paused too ({t_lark_paused:.2f} s)")

    # ---------------------------------------------------------------- check
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.reg"
        path.write_text(text, encoding="utf-8")
        target = f"{Path(__file__).resolve()}:blocks"
        with_model = ["check", str(path), "--model", target, "--model-arg", f"blocks={n_blocks}"]
        t_plain, t_model = timed_together(
            [quiet(lambda: cli(["check", str(path)])), quiet(lambda: cli(with_model))], cpu, args.repeats or 3, warmup=1
        )
        found = io.StringIO()
        with contextlib.redirect_stdout(found):
            cli([*with_model, "--format", "json"])
        summary = json.loads(found.getvalue())["summary"]
        # What --model adds that is not regdsl's: building the model (on meta, as the command line does).
        (t_build,) = timed_together([lambda: load_model(target, {"blocks": n_blocks})], cpu, 1, warmup=0)
    report(
        "check", t_model / t_plain, 3,
        f"{lines:,} lines on {n_blocks:,} blocks ({n_blocks * 12 + 4:,} tensors): --model {t_model:.2f} s "
        f"(building the model {t_build:.2f} s of it), without {t_plain:.2f} s; "
        f"{summary['errors']} errors, {summary['warnings']} warnings",
    )


if __name__ == "__main__":
    main()
