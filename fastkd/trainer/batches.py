"""Batch and model-output conventions the Distiller accepts: ``(inputs, target)`` tuples, dicts in the
``input_ids`` / ``labels`` style, and models that return a tensor or an object with ``.logits``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# Keys a dict batch may carry its targets under (Hugging Face uses "labels").
TARGET_KEYS = ("labels", "label", "targets", "target")


def move_to(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """Split a batch into (model inputs, target). The target is None for unlabelled batches."""
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        target = None
        for key in TARGET_KEYS:
            if key in inputs:
                target = inputs.pop(key)
                break
        return inputs, target
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(
            f"a tuple batch must be (inputs, target) or (inputs,), got a {type(batch).__name__} of "
            f"length {len(batch)}; wrap several inputs in a tuple or dict: ((x1, x2), target)"
        )
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(
        f"batches must be (inputs, target) tuples, dicts or tensors, got {type(batch).__name__}"
    )


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """Call a model the way its inputs ask: ``model(**d)`` for dicts, ``model(*t)`` for tuples."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def get_logits(output: Any, who: str) -> torch.Tensor:
    """The logits of a model output: the tensor itself, ``output.logits`` or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the {who} must return a logits tensor or an object with a .logits tensor, "
            f"got {type(output).__name__}"
        )
    return logits


def count_correct(
    logits: torch.Tensor, target: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) top-1 predictions over rows whose target is a class (not ignored, >= 0), as
    tensors on the logits' device so that logging never waits for the GPU."""
    if target is None:
        zero = torch.zeros((), dtype=torch.long, device=logits.device)
        return zero, zero
    valid = (target != ignore_index) & (target >= 0)
    pred = logits.detach().argmax(dim=-1)
    return ((pred == target) & valid).sum(), valid.sum()
