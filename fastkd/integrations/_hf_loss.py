"""The loss glue between Hugging Face causal-LM models and fastkd: shifted targets, vocabulary slicing,
the lm_head's output transforms, and token counting."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fastkd.integrations._hf_head import unwrap_peft

IGNORE_INDEX = -100


def causal_lm_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The target of each position: ``labels[..., 1:]`` padded with -100 at the end, shape ``(B, S)``.

    Position t's logits predict token t + 1, as in transformers' causal-LM loss; keeping the logits'
    full length (the last position masked) lets the loss read them in place, without the copy that
    ``logits[..., :-1, :]`` would force. A collator's precomputed ``shift_labels`` (same shape) is used
    as given.
    """
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(batches: list[Mapping[str, Any]]) -> torch.Tensor | None:
    """Supervised tokens (shifted labels that are not -100) over ``batches``; None when one has no labels."""
    counts = []
    for batch in batches:
        if batch.get("shift_labels") is not None:
            counts.append(batch["shift_labels"].ne(IGNORE_INDEX).sum())
        elif batch.get("labels") is not None:
            counts.append(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum())
        else:
            return None
    return torch.stack([c.cpu() for c in counts]).sum() if counts else None


def head_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` that the model applies after its lm_head matmul, from its config:
    Cohere's ``logit_scale``, Granite's ``logits_scaling`` (a divisor) and Gemma 2 / 3's
    ``final_logit_softcapping``."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    scale = float(getattr(text_config, "logit_scale", None) or 1.0)
    divisor = getattr(text_config, "logits_scaling", None)
    if divisor:
        scale /= float(divisor)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return scale, None if softcap is None else float(softcap)


def base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(base_model, lm_head)`` of a causal LM, or of the one inside a PEFT ``PeftModel`` (whose inner
    adapters the base model runs). The head's ``x @ W.T + b`` comes from
    :func:`fastkd.integrations._hf_head.head_weight_and_bias` once ``check_head`` accepted it.

    Raises:
        ValueError: the model has no separate base model and output embedding (not a ``...ForCausalLM``),
            or a PEFT prompt-learning adapter is active.
    """
    model = unwrap_peft(model)
    base = getattr(model, "base_model", model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if base is model or head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"fused_linear=True needs a causal LM with a base model and an lm_head (get_output_embeddings()), "
            f"got {type(model).__name__}"
        )
    return base, head


def last_hidden_state(base: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The base model's final hidden states ``(B, S, H)``: the lm_head's input (after the final norm)."""
    out = base(**inputs)
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden
