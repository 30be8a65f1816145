"""Small models shared by the selector, group and penalty tests.

Every model here is tiny and deterministic (seeded), so the tests can derive by
hand, from the module structure below, which parameter a rule must hit.
"""

from __future__ import annotations

import torch
from torch import nn


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


class MLP(nn.Module):
    """fc1 -> fc2 -> head; parameter order: fc1.weight, fc1.bias, fc2.weight, fc2.bias, head.weight, head.bias."""

    def __init__(self, n_in: int = 6, hidden: int = 16, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv2d + BatchNorm2d twice, then a Linear head (conv2 has no bias)."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class RMSNorm(nn.Module):
    """A hand-written RMSNorm, as models outside torch.nn define it: `norm` must find it by its name."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MyLayerNorm(nn.Module):
    """Not a torch.nn class either; only its name says it normalizes."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:]) * self.gain + self.shift


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, MultiheadAttention, custom RMSNorm, Linear MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        # Owns in_proj_weight/in_proj_bias itself; out_proj is a Linear *subclass*.
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A small decoder: embed (tied to lm_head), a root-level pos_embed Parameter, blocks, ln_f.

    Registration order of parameter tensors (the root's own parameters come first):
      pos_embed, embed.weight (= lm_head.weight),
      blocks.{i}.ln1.weight, blocks.{i}.ln1.bias,
      blocks.{i}.attn.in_proj_weight, blocks.{i}.attn.in_proj_bias,
      blocks.{i}.attn.out_proj.weight, blocks.{i}.attn.out_proj.bias,
      blocks.{i}.ln2.weight,
      blocks.{i}.mlp.0.weight, blocks.{i}.mlp.0.bias, blocks.{i}.mlp.2.weight, blocks.{i}.mlp.2.bias,
      ln_f.weight, ln_f.bias
    """

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, n_layers: int = 2, seq: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos_embed[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def transformer_param_names(n_layers: int = 2) -> list[str]:
    """The first name of every tensor of TinyTransformer, in registration order (written out by hand)."""
    names = ["pos_embed", "embed.weight"]
    for i in range(n_layers):
        b = f"blocks.{i}"
        names += [
            f"{b}.ln1.weight",
            f"{b}.ln1.bias",
            f"{b}.attn.in_proj_weight",
            f"{b}.attn.in_proj_bias",
            f"{b}.attn.out_proj.weight",
            f"{b}.attn.out_proj.bias",
            f"{b}.ln2.weight",
            f"{b}.mlp.0.weight",
            f"{b}.mlp.0.bias",
            f"{b}.mlp.2.weight",
            f"{b}.mlp.2.bias",
        ]
    return names + ["ln_f.weight", "ln_f.bias"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter (norm gains and zero biases included) distinct nonzero values.

    Freshly initialised norms are all ones and biases often zeros, which would let a
    penalty that hits the wrong tensor still come out right.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 LM built from a config (nothing downloaded); lm_head is tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def bert(seed: int = 0) -> nn.Module:
    """A 1-layer BertForMaskedLM: decoder.weight tied to word_embeddings, decoder.bias to predictions.bias."""
    from transformers import BertConfig, BertForMaskedLM

    seeded(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        pad_token_id=0,
    )
    return BertForMaskedLM(config)
