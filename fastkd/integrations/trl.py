"""fastkd as the loss of TRL's on-policy ``DistillationTrainer`` (extra ``[trl]``).

:class:`DistillationConfig` and :class:`DistillationTrainer` take every argument of TRL's classes of
the same names (generation, vLLM, tools, ``beta``, ``temperature``, ...) and replace only the loss:
:func:`fastkd.fused_linear_distill_loss` on the student's and teacher's final hidden states and
``lm_head`` weights over the generated completion tokens, normalised by TRL's count of completion
tokens of the whole batch (``num_items_in_batch``). A TRL script changes one import::

    # from trl import DistillationConfig, DistillationTrainer
    from fastkd.integrations.trl import DistillationConfig, DistillationTrainer

With the defaults the loss is TRL's: the generalized JSD with TRL's ``beta`` (fastkd's ``"jsd"`` has
the same convention: m = beta p + (1 - beta) q with p the teacher and q the student, beta = 0 is
KL(p || q), beta = 1 is KL(q || p)), at TRL's ``temperature``, without T^2 and without a hard term.
The extra knobs: ``divergence`` (every fastkd divergence), ``skew_beta`` (the skew divergences' beta),
``loss_temperature`` (the softmax temperature of the loss, apart from the sampling ``temperature``),
``scale_by_temperature_squared``, ``alpha`` (below 1: the hard cross-entropy on the completion
tokens), ``label_smoothing`` and ``chunk_size``.

The loss runs where TRL runs its own, inside the student's forward (TRL's forward redirection), so
DDP, FSDP2 and DeepSpeed ZeRO-3 see it as TRL's. Each head is its model's own, read from its config
as TRL reads it (lm_head bias, ``logit_scale`` and its variants, ``final_logit_softcapping``); the
student's and the teacher's may differ. A teacher whose lm_head is padded beyond the student's
vocabulary is used over the student's vocabulary (its first V_student rows), which TRL refuses. TRL's
per-token student entropy metric is computed in row chunks of the student's head, without grad and
without N x V logits (one extra matmul of the student's head over the completion tokens).

Importing this module imports TRL; ``import fastkd`` does not.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from trl.models import prepare_deepspeed
from trl.trainer.utils import maybe_gather_lm_head_ctx

import fastkd
from fastkd.integrations import _trl_head
from fastkd.sharding import is_dtensor

__all__ = ["DistillationConfig", "DistillationTrainer"]

_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
_SKEWED = ("skew_forward_kl", "skew_reverse_kl")
# Multimodal inputs TRL's trainer passes through to the backbones.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class DistillationConfig(trl.DistillationConfig):
    """TRL's ``DistillationConfig`` plus fastkd's loss knobs (defaults: TRL's own loss).

    Args:
        divergence: one of fastkd's divergences (default ``"jsd"``: with TRL's ``beta``, TRL's loss).
        skew_beta: beta of ``"skew_forward_kl"`` / ``"skew_reverse_kl"`` (None: fastkd's default, 0.1).
        loss_temperature: softmax temperature of the loss (None: TRL's sampling ``temperature``).
        scale_by_temperature_squared: multiply the soft term by T^2 (TRL does not).
        alpha: weight of the soft term; below 1 the rest is the hard cross-entropy on the completion tokens.
        label_smoothing: of the hard cross-entropy.
        chunk_size: completion tokens per chunk of logits (None: fastkd's default from the vocabulary).
    """

    divergence: str = field(default="jsd", metadata={"help": f"fastkd divergence, one of {_DIVERGENCES}."})
    skew_beta: float | None = field(default=None, metadata={"help": "beta of the skew divergences."})
    loss_temperature: float | None = field(
        default=None, metadata={"help": "Softmax temperature of the loss; None: the sampling `temperature`."})
    scale_by_temperature_squared: bool = field(default=False, metadata={"help": "Scale the soft term by T^2."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the soft term; 1 - alpha: hard cross-entropy."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the hard cross-entropy."})
    chunk_size: int | None = field(default=None, metadata={"help": "Completion tokens per chunk of logits."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_loss_args(self)
        if self.loss_temperature is None:
            self.loss_temperature = self.temperature


def _check_loss_args(args: DistillationConfig) -> None:
    """The knobs fastkd would refuse at the first step, refused when the configuration is made."""
    if args.divergence not in _DIVERGENCES:
        raise ValueError(f"divergence must be one of {_DIVERGENCES}, got {args.divergence!r}")
    if args.skew_beta is not None and args.divergence not in _SKEWED:
        raise ValueError(f"skew_beta is used only by {_SKEWED}, not by divergence={args.divergence!r}")
    if args.skew_beta is not None and not 0.0 <= args.skew_beta < 1.0:
        raise ValueError(f"skew_beta must be in [0, 1), got {args.skew_beta}")
    if args.divergence == "jsd" and not 0.0 <= args.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] for divergence='jsd', got {args.beta}")
    temperature = args.loss_temperature
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"loss_temperature must be finite and > 0, got {temperature}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {args.alpha}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {args.chunk_size}")


def _whole(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """An FSDP2 shard (DTensor) read outside its module's forward as the whole tensor; others as they are."""
    if x is None:
        return None
    if is_dtensor(x):
        x = x.full_tensor()
        return x if dtype is None else x.to(dtype)
    return x


class DistillationTrainer(trl.DistillationTrainer):
    """TRL's ``DistillationTrainer`` whose loss is :func:`fastkd.fused_linear_distill_loss`.

    Takes TRL's arguments with a :class:`DistillationConfig` (TRL's configuration gives TRL's loss
    knobs their defaults). Generation, batching, ``num_items_in_batch`` and the forward redirection
    through the DDP / FSDP / DeepSpeed wrapper are TRL's.

    A teacher whose vocabulary is larger than the student's (its lm_head padded beyond the tokenizer,
    as Qwen2.5's larger models against its smaller ones) is used over the student's vocabulary: rows
    [0, V_student) of its lm_head; a student larger than its teacher is refused.
    """

    def __init__(self, model: Any, teacher_model: Any = None, args: trl.DistillationConfig | None = None,
                 *rest: Any, **kwargs: Any) -> None:
        # TRL refuses vocabularies that differ: the teacher is loaded and prepared here, as TRL does.
        if isinstance(teacher_model, str) and args is not None:
            teacher_model = _trl_head.load_teacher(teacher_model, args)
        elif teacher_model is not None and args is not None and args.teacher_model_init_kwargs is not None:
            raise ValueError("teacher_model_init_kwargs is set, but the teacher_model is already a model: its "
                             "keywords would be ignored")
        own_teacher = isinstance(teacher_model, torch.nn.Module)
        super().__init__(model, None if own_teacher else teacher_model, args, *rest, **kwargs)
        if own_teacher:
            self._check_vocabularies(teacher_model)
            self.teacher_model = (prepare_deepspeed(teacher_model, self.accelerator) if self.is_deepspeed_enabled
                                  else self.accelerator.prepare_model(teacher_model, evaluation_mode=True))

    def _check_vocabularies(self, teacher_model: torch.nn.Module) -> None:
        student_vocab = self.model.config.get_text_config().vocab_size
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        if _trl_head.check_vocabularies(student_vocab, teacher_vocab):
            warnings.warn(
                f"the teacher's vocabulary ({teacher_vocab}) is larger than the student's ({student_vocab}): the "
                f"loss uses the teacher's first {student_vocab} logits (its lm_head's extra rows are taken as "
                "padding beyond the tokenizer)", stacklevel=3)

    def _loss_kwargs(self) -> dict[str, Any]:
        args = self.args
        divergence = getattr(args, "divergence", "jsd")
        if divergence == "jsd":
            beta = self.beta
        else:
            beta = getattr(args, "skew_beta", None) if divergence in _SKEWED else None
        temperature = getattr(args, "loss_temperature", None)
        return dict(
            divergence=divergence, beta=beta,
            temperature=self.temperature if temperature is None else temperature,
            scale_by_temperature_squared=getattr(args, "scale_by_temperature_squared", False),
            alpha=getattr(args, "alpha", 1.0), label_smoothing=getattr(args, "label_smoothing", 0.0),
            chunk_size=getattr(args, "chunk_size", None),
        )

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # Called by TRL's compute_loss inside the student wrapper's forward; returns what TRL's does.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool outputs are not the student's tokens
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():  # through the teacher's own wrapper, so its shards are gathered
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                input_ids, attention_mask, logits_to_keep, **multimodal)

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        device = student_head.weight.device
        student_config = unwrapped_student.config.get_text_config()
        options = _trl_head.head_options(student_config, unwrapped_teacher.config.get_text_config())
        # The teacher's completion tokens are the student's targets: only its masked ones are dropped.
        target = inputs["completion_ids"].masked_fill(loss_mask == 0, -100).to(device)
        with maybe_gather_lm_head_ctx(student_head.weight, student_head.bias), \
                maybe_gather_lm_head_ctx(teacher_head.weight, teacher_head.bias):
            student_weight = _whole(student_head.weight, student_hidden.dtype)
            teacher_weight = _whole(teacher_head.weight, teacher_hidden.dtype)
            student_bias = _whole(student_head.bias)
            padded = _trl_head.check_vocabularies(student_weight.shape[0], teacher_weight.shape[0])
            loss = fastkd.fused_linear_distill_loss(
                student_hidden.to(device), student_weight, target, teacher_hidden=teacher_hidden.to(device),
                teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=_whole(teacher_head.bias),
                vocab_size=student_weight.shape[0] if padded else None, num_items_in_batch=num_items_in_batch,
                **options, **self._loss_kwargs(),
            )
            # TRL's metric: the student's entropy at the sampling temperature, summed over the loss's tokens.
            entropy = _trl_head.entropy_sum(
                student_hidden.detach().to(device), student_weight.detach(),
                None if student_bias is None else student_bias.detach(), (loss_mask != 0).to(device),
                options["logit_scale"][0], options["softcap"][0], self.temperature,
                getattr(self.args, "chunk_size", None))
        return loss, entropy, (loss_mask != 0).sum()
