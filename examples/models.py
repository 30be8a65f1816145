"""Models for trying `regdsl check --model` and `regdsl explain` from the command line.

    regdsl check examples/rules.reg --model examples/train.py:Classifier
    regdsl explain examples/cnn.reg --model examples/train_cnn.py:SmallCNN
    regdsl explain examples/gpt2.reg --model examples/models.py:tiny_gpt2
"""

from __future__ import annotations

from torch import nn


def small_cnn(channels: int = 16, classes: int = 10) -> nn.Module:
    """A CIFAR-sized CNN: conv/BatchNorm blocks and a linear classifier head."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False), nn.BatchNorm2d(2 * channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * channels, classes),
    )


def tiny_gpt2(layers: int = 2, width: int = 64, vocab: int = 1000) -> nn.Module:
    """GPT-2 from a small config (needs `pip install regdsl[hf]`; nothing is downloaded).

    Its LM head is tied to the token embedding, its linear layers are `Conv1D`,
    and its norms are `nn.LayerNorm` named ln_1, ln_2 and ln_f.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)
