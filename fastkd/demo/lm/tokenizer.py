"""A byte-level BPE tokenizer trained at run time on the training split (Hugging Face ``tokenizers``)."""
from __future__ import annotations

import torch

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with ``vocab_size`` entries (the 256 bytes, merges, and the end-of-text token).
    Byte-level: any text encodes, nothing maps to an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """All documents as one int64 token stream, each followed by the end-of-text token (so a window that
    crosses a file boundary sees where one file ends)."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
