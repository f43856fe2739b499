"""Tiny random models and tokenizers for plumbing tests (no downloads).

These exercise code paths only; quality claims come from the real SmolLM2
benchmarks, never from these models.
"""

from __future__ import annotations

import pathlib

import torch

__all__ = ["TINY_TEXTS", "make_tiny_tokenizer", "save_tiny_llama"]

TINY_TEXTS = [
    "the quick brown fox jumps over the lazy dog and runs into the forest",
    "a small model learns to predict the next word from the words before it",
    "pruning removes weights while keeping the loss of the network small",
    "second order methods use the curvature of the loss around the weights",
    "the reconstruction error of each layer is measured on calibration inputs",
    "two of every four weights are zero in a semi structured sparse matrix",
    "the fisher information is the expected outer product of the gradients",
    "one shot pruning needs no retraining and only a little calibration data",
]


def make_tiny_tokenizer(texts: list[str] = TINY_TEXTS):
    """A word-level PreTrainedTokenizerFast over ``texts`` (plus specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def save_tiny_llama(
    path: str | pathlib.Path,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    seed: int = 0,
) -> pathlib.Path:
    """Save a random LlamaForCausalLM and its tokenizer to ``path``; return it.

    Widths are multiples of 4 so every Linear can be exactly 2:4.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = pathlib.Path(path)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
