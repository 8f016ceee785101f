"""The lm_head side of fastkd's TRL trainer: each head's logit scale and soft cap read from its config as
TRL reads them, the vocabulary the loss runs over (a teacher padded beyond the student's), loading a
teacher given by name as TRL does, and the student's per-token entropy computed in row chunks."""
from __future__ import annotations

from typing import Any

import torch

from fastkd.fused_linear import _default_chunk_size


def logit_scale(config: Any) -> float:
    """The factor a model's head applies to its logits before any soft cap (1 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    # HyperCLOVA X multiplies by logits_scaling; Granite and MiniCPM3 divide by it.
    return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)


def softcap(config: Any) -> float | None:
    """Gemma's final-logit soft cap (None: no cap)."""
    value = getattr(config, "final_logit_softcapping", None)
    return None if value is None else float(value)


def head_options(student_config: Any, teacher_config: Any) -> dict[str, tuple]:
    """``logit_scale`` and ``softcap`` of :func:`fastkd.fused_linear_distill_loss` as (student, teacher) pairs."""
    return dict(logit_scale=(logit_scale(student_config), logit_scale(teacher_config)),
                softcap=(softcap(student_config), softcap(teacher_config)))


def check_vocabularies(student_vocab: int, teacher_vocab: int) -> bool:
    """Whether the teacher's vocabulary is padded beyond the student's (its extra entries are dropped).

    Raises:
        ValueError: the student's vocabulary is the larger one.
    """
    if student_vocab > teacher_vocab:
        raise ValueError(
            f"the student's vocabulary ({student_vocab}) is larger than the teacher's ({teacher_vocab}): the "
            "teacher has no distribution over the student's extra tokens; distill from a teacher of the same "
            "tokenizer whose lm_head has at least the student's rows")
    return teacher_vocab > student_vocab


def load_teacher(name: str, args: Any) -> torch.nn.Module:
    """The teacher given by name, loaded with TRL's keywords (``teacher_model_init_kwargs``, revision, ...)."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # distributed training places the model itself
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name, **kwargs)


@torch.no_grad()
def entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                scale: float, cap: float | None, temperature: float, chunk_size: int | None) -> torch.Tensor:
    """Sum over the selected rows of the entropy (nats, float32) of softmax(head(hidden) / temperature),
    head(h) = cap tanh(scale (h W^T + b) / cap), in chunks of rows: at most chunk_size x V logits at once."""
    h = hidden.reshape(-1, hidden.shape[-1])[rows.reshape(-1)]
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    step = chunk_size or _default_chunk_size(weight.shape[0], 4, h.device.type)
    for start in range(0, h.shape[0], step):
        chunk = h[start:start + step].to(weight.dtype)
        z = (chunk @ weight.T if bias is None else torch.addmm(bias, chunk, weight.T)).float()
        z.mul_(scale)
        if cap is not None:
            z.div_(cap).tanh_().mul_(cap)
        z.div_(temperature)
        log_p = z.log_softmax(-1)
        total += -(log_p.exp() * log_p).sum()
    return total
