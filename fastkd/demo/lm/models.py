"""Llama-style teacher and student (``transformers.LlamaForCausalLM``, random initialization)."""
from __future__ import annotations

import torch


def intermediate_size(hidden: int) -> int:
    """Llama's MLP width: 8/3 of the hidden size, rounded up to a multiple of 16."""
    return -(-(8 * hidden) // 3 // 16) * 16


def build_llama(vocab_size: int, hidden: int, layers: int, heads: int, max_len: int, seed: int):
    """A ``LlamaForCausalLM`` whose weights depend only on ``seed`` and the shape (every student built with
    the same seed starts from the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the number of heads {heads}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate_size(hidden),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_len, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.train()
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
