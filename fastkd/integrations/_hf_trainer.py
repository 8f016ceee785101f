"""``DistillationTrainer``: ``transformers.Trainer`` whose loss is fastkd's distillation loss."""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

import fastkd
from fastkd.integrations._hf_config import DistillationConfig
from fastkd.integrations._hf_head import check_head, head_weight_and_bias
from fastkd.integrations._hf_loss import (
    base_and_head,
    causal_lm_targets,
    count_targets,
    head_transform,
    last_hidden_state,
)
from fastkd.sharding import is_fsdp2, is_zero3, shard_frozen, zero3_frozen


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` (causal LMs).

    The constructor takes the names of TRL's ``GKDTrainer`` (``model``, ``teacher_model``, ``args``);
    every other keyword goes to ``transformers.Trainer``. The loss of each step is
    :func:`fastkd.distill_loss` (or, with ``args.fused_linear``, :func:`fastkd.fused_linear_distill_loss`)
    with the knobs of :class:`DistillationConfig` (Hinton et al. 2015 for the default forward KL):

    - Targets are the labels shifted by one, as transformers' causal-LM loss: position t's logits predict
      ``labels[:, t + 1]``; -100 (padding, prompt tokens) masks both the hard and the distillation term.
    - The loss is the mean over the supervised tokens of the whole gradient-accumulation window and, with
      ``average_tokens_across_devices`` (the default), of all processes: the Trainer's
      ``num_items_in_batch`` is counted over the shifted labels and passed to fastkd, so 2 micro-batches
      of accumulation or 2 processes give the update of one batch holding all their sequences.
    - The evaluation loss of a batch is its per-token mean (the training loss's scale); the Trainer
      averages the batches of the evaluation set weighted by their number of sequences.
    - The teacher runs in eval mode under ``torch.no_grad()`` on the same inputs (so the same tokenizer)
      and is moved to ``args.device`` (unless it was loaded with a ``device_map``); under torchrun with
      DDP each process holds its own copy (it is never wrapped in DistributedDataParallel). With a
      student sharded by FSDP2 (``fully_shard`` applied before the trainer is built; accelerate then
      leaves it unwrapped) the teacher is sharded with ``fully_shard`` too, and under DeepSpeed ZeRO-3
      (``args.deepspeed``) partitioned by an engine of its own without optimizer: forward only, no
      gradients, no optimizer state, gathered block by block by the framework. A teacher with a larger
      (padded) vocabulary is read as ``teacher_logits[..., :V]``, a view.
    - ``teacher_model=None``: offline distillation from the batch's top-k teacher columns
      (``args.teacher_topk_indices_column``, ``args.teacher_topk_logprobs_column``, each ``(B, S, K)``,
      aligned with the logits), as a :class:`fastkd.SparseTeacher` of T = 1 log-probabilities.
    - ``fused_linear=True``: the student's base model (``model.base_model``) gives the final hidden states
      and the loss is computed from them and the lm_head weights of both models in row chunks: the
      student's lm_head forward never runs and no (B, S, V) logits exist. Each head's weight is read
      inside its model's and its head's forward (:func:`fastkd.inside_forward`): gathered there once per
      step under FSDP2 / ZeRO-3, and the student's gradient goes through the framework's reduction.
      Each head applies its own ``logit_scale`` / ``logits_scaling`` / ``final_logit_softcapping``
      (from its config), so a Gemma 2 student may learn from a Cohere teacher.
      A PEFT student runs its inner model's base model; the lm_head's ``modules_to_save`` copy, or its
      LoRA adapters folded into the weight (``W + scaling * B @ A``), give the head it computes. A head
      the fused path cannot compute exactly (LoRA dropout in training, DoRA, another class, a forward
      hook, prompt learning) raises a ``ValueError`` naming ``fused_linear=False``.

    Args:
        model: the student, a ``...ForCausalLM`` (``transformers.PreTrainedModel`` or any module whose
            outputs have ``.logits``).
        teacher_model: the teacher, or None for an offline teacher in the batch.
        args: a :class:`DistillationConfig` (default: ``DistillationConfig()``).
        **trainer_kwargs: ``transformers.Trainer``'s other arguments (datasets, collator, optimizers, ...).

    Raises:
        TypeError: ``args`` is not a :class:`DistillationConfig`, or ``teacher_model`` is not a module.
        ValueError: a ``compute_loss_func`` is given (this trainer computes the loss).
        NotImplementedError: several GPUs in one process (``torch.nn.DataParallel``); use torchrun.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: DistillationConfig | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationConfig()
        if not isinstance(args, DistillationConfig):
            raise TypeError(f"args must be a DistillationConfig (TrainingArguments plus the loss), got {type(args).__name__}")
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be a torch.nn.Module or None, got {type(teacher_model).__name__}")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes the loss itself: do not pass compute_loss_func")
        sharded = model is not None and is_fsdp2(model)
        if sharded:
            _owns_its_sharding(model)
        super().__init__(model=model, args=args, **trainer_kwargs)
        if self.args.n_gpu > 1:
            raise NotImplementedError(
                f"DistillationTrainer runs one device per process; this process sees {self.args.n_gpu} GPUs "
                "(torch.nn.DataParallel). Start one process per GPU with torchrun instead"
            )
        # compute_loss takes num_items_in_batch and normalises by it (the Trainer then skips its own
        # division by the accumulation steps).
        self.model_accepts_loss_kwargs = True
        if teacher_model is not None:
            teacher_model.eval()
            self._teacher_engine = None
            zero3 = self.is_deepspeed_enabled and self._zero_stage() == 3
            if zero3 and not is_zero3(teacher_model):
                # Partitioned like the student, not a whole copy per process.
                self._teacher_engine = zero3_frozen(teacher_model, self.args.hf_deepspeed_config.config)
            elif sharded and self.args.world_size > 1 and not is_fsdp2(teacher_model):
                shard_frozen(teacher_model.to(self.args.device), self.args.device.type)
            elif getattr(teacher_model, "hf_device_map", None) is None and not (
                    is_fsdp2(teacher_model) or is_zero3(teacher_model)):
                teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def _zero_stage(self) -> int:
        config = getattr(self.args, "hf_deepspeed_config", None)
        return int((getattr(config, "config", None) or {}).get("zero_optimization", {}).get("stage", 0) or 0)

    @property
    def _counts_across_processes(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device | None = None
    ) -> tuple[list, torch.Tensor | None]:
        """The next ``num_batches`` batches and their supervised-token count (over the shifted labels,
        summed over the processes when ``average_tokens_across_devices``): the ``num_items_in_batch``
        of every micro-batch of the window."""
        batches = list(itertools.islice(epoch_iterator, num_batches))
        count = count_targets(batches)
        if count is not None:
            count = count.to(device if device is not None else self.args.device)
            if self._counts_across_processes:
                count = self.accelerator.gather(count.reshape(1)).sum()
            count = count.clamp(min=1)  # a window with no supervised token: the loss is 0 either way
        return batches, count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The distillation loss of one (micro-)batch.

        Args:
            model: the (possibly DistributedDataParallel-wrapped) student.
            inputs: the batch: ``labels`` ``(B, S)`` (-100 where not supervised; or ``shift_labels``,
                already shifted), the model's inputs (``input_ids``, ``attention_mask``, ...) and, for an
                offline teacher, the top-k columns ``(B, S, K)``.
            return_outputs: also return the student's outputs (``{"loss": loss}`` with ``fused_linear``,
                which computes no logits).
            num_items_in_batch: supervised tokens of the accumulation window (all processes); the loss is
                the window's sum divided by it (training only; evaluation uses the batch's own mean).

        Returns:
            The loss (a 0-d float32 tensor), or ``(loss, outputs)``.

        Raises:
            ValueError: no ``labels``; offline columns missing; a teacher vocabulary smaller than the
                loss's; heads whose output transforms differ (``fused_linear``).
        """
        args: DistillationConfig = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        topk_indices = inputs.pop(args.teacher_topk_indices_column, None)
        topk_logprobs = inputs.pop(args.teacher_topk_logprobs_column, None)
        if labels is None and shift_labels is None:
            raise ValueError("DistillationTrainer needs 'labels' (B, S) in every batch (-100 where not supervised)")
        target = causal_lm_targets(labels, shift_labels)
        if not model.training:
            num_items_in_batch = None
        loss_kwargs = dict(args.loss_kwargs(), num_items_in_batch=num_items_in_batch)
        if self.teacher_model is None:
            loss, outputs = self._offline_loss(model, inputs, target, topk_indices, topk_logprobs, loss_kwargs)
        elif args.fused_linear:
            loss = self._fused_linear_loss(model, inputs, target, loss_kwargs)
            outputs = {"loss": loss}
        else:
            outputs = model(**inputs)
            vocab = args.vocab_size or outputs.logits.shape[-1]
            with torch.no_grad():
                teacher_logits = self.teacher_model(**self._teacher_inputs(inputs)).logits
            self._check_vocab("teacher logits", teacher_logits.shape[-1], vocab)
            self._check_vocab("student logits", outputs.logits.shape[-1], vocab)
            loss = fastkd.distill_loss(outputs.logits[..., :vocab], teacher_logits[..., :vocab], target, **loss_kwargs)
        if num_items_in_batch is not None and self._counts_across_processes:
            # DistributedDataParallel averages the gradients of the processes; the loss already divides by
            # the tokens of all of them.
            loss = loss * self.accelerator.num_processes
        if return_outputs:
            if isinstance(outputs, dict) and "loss" in outputs:
                outputs["loss"] = loss
            return loss, outputs
        return loss

    def _check_vocab(self, what: str, have: int, vocab: int) -> None:
        if have < vocab:
            raise ValueError(
                f"the {what} have a vocabulary of {have} entries, fewer than the loss's {vocab} "
                "(DistillationConfig.vocab_size, default the student's): the loss needs every class in both"
            )

    def _teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The student's inputs for the teacher, with ``use_cache=False`` where its forward takes it."""
        teacher = self.teacher_model
        params = inspect.signature(teacher.forward).parameters
        if "use_cache" in params and "use_cache" not in inputs:
            return {**inputs, "use_cache": False}
        return inputs

    def _fused_linear_loss(
        self, model: nn.Module, inputs: dict[str, Any], target: torch.Tensor, loss_kwargs: dict[str, Any],
        sparse_teacher: fastkd.SparseTeacher | None = None,
    ) -> torch.Tensor:
        """The loss from the student's final hidden states and lm_head weight, against the teacher model's
        (or an offline top-k teacher): no N x V logits.

        Each head's weight is read inside its own model's forward (through the wrappers): FSDP2 has
        gathered it there, once per step, and the student's lm_head gradient goes through the wrapper's
        reduction (DistributedDataParallel's all-reduce, FSDP2's reduce-scatter) like every other one."""
        args: DistillationConfig = self.args
        student = self.accelerator.unwrap_model(model)
        # Before any forward: a head the fused path would not compute exactly is refused.
        check_head(base_and_head(student)[1], "student's lm_head")
        if sparse_teacher is None:
            check_head(base_and_head(self.teacher_model)[1], "teacher's lm_head")
        # Each head keeps its own (logit_scale, softcap); an offline teacher's values are already its logits.
        s_scale, s_cap = head_transform(student)
        t_scale, t_cap = head_transform(self.teacher_model) if sparse_teacher is None else (1.0, None)

        def loss_fn(hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: torch.Tensor | None, vocab: int,
                    **teacher: Any) -> torch.Tensor:
            return fastkd.fused_linear_distill_loss(
                hidden.to(s_weight.dtype), s_weight, target, student_bias=s_bias, logit_scale=(s_scale, t_scale),
                softcap=(s_cap, t_cap), vocab_size=vocab, chunk_size=args.chunk_size, **teacher, **loss_kwargs,
            )

        def student_forward(**model_inputs: Any) -> torch.Tensor:
            s_base, s_head = base_and_head(student)
            with self.accelerator.autocast():
                hidden = last_hidden_state(s_base, model_inputs)

            def student_head(hidden: torch.Tensor) -> torch.Tensor:
                s_weight, s_bias = head_weight_and_bias(s_head)
                vocab = args.vocab_size or s_weight.shape[0]
                self._check_vocab("student lm_head", s_weight.shape[0], vocab)
                if sparse_teacher is not None:
                    return loss_fn(hidden, s_weight, s_bias, vocab, teacher_logits=sparse_teacher)
                return self._inside_teacher_forward(
                    model_inputs, lambda t_hidden, t_weight, t_bias: loss_fn(
                        hidden, s_weight, s_bias, vocab, teacher_hidden=t_hidden.to(t_weight.dtype),
                        teacher_weight=t_weight.detach(), teacher_bias=None if t_bias is None else t_bias.detach()),
                    vocab)

            # Inside the head's own forward too: ZeRO-3 (and FSDP2 with a head sharded as a group of its
            # own) gather the head's weight there.
            return fastkd.inside_forward(s_head, student_head, hidden)

        return fastkd.inside_forward(model, student_forward, **inputs)

    def _inside_teacher_forward(self, inputs: dict[str, Any], fn: Any, vocab: int) -> torch.Tensor:
        """``fn(teacher_hidden, teacher_weight, teacher_bias)``, run inside the teacher's forward and its
        head's (where a sharded teacher's head is gathered); no gradient reaches the teacher."""
        teacher = self.teacher_model
        result: list[torch.Tensor] = []

        def teacher_head(t_hidden: torch.Tensor, t_head: nn.Module) -> None:
            with torch.no_grad():
                t_weight, t_bias = head_weight_and_bias(t_head)
            self._check_vocab("teacher lm_head", t_weight.shape[0], vocab)
            # The loss leaves by the closure, not as the teacher's output: a sharded teacher's wrapper
            # would otherwise gather its parameters again in backward for a gradient it never gets.
            result.append(fn(t_hidden, t_weight, t_bias))

        def teacher_forward(**model_inputs: Any) -> None:
            t_base, t_head = base_and_head(teacher)
            with torch.no_grad():
                t_hidden = last_hidden_state(t_base, model_inputs)
            fastkd.inside_forward(t_head, teacher_head, t_hidden, t_head)

        fastkd.inside_forward(teacher, teacher_forward, **self._teacher_inputs(inputs))
        return result[0]

    def _offline_loss(
        self, model: nn.Module, inputs: dict[str, Any], target: torch.Tensor, topk_indices: torch.Tensor | None,
        topk_logprobs: torch.Tensor | None, loss_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        args: DistillationConfig = self.args
        if topk_indices is None or topk_logprobs is None:
            raise ValueError(
                f"teacher_model=None distils from an offline teacher: every batch needs the columns "
                f"{args.teacher_topk_indices_column!r} and {args.teacher_topk_logprobs_column!r} (B, S, K) "
                "(keep them with remove_unused_columns=False, DistillationConfig's default)"
            )
        teacher = fastkd.SparseTeacher(topk_indices, topk_logprobs, kind="logprobs", tail=args.teacher_topk_tail)
        if args.fused_linear:
            loss = self._fused_linear_loss(model, inputs, target, loss_kwargs, sparse_teacher=teacher)
            return loss, {"loss": loss}
        outputs = model(**inputs)
        vocab = args.vocab_size or outputs.logits.shape[-1]
        self._check_vocab("student logits", outputs.logits.shape[-1], vocab)
        return fastkd.distill_loss(outputs.logits[..., :vocab], teacher, target, **loss_kwargs), outputs


def _owns_its_sharding(model: nn.Module) -> None:
    """Mark an FSDP2-sharded student as the Trainer's models sharded at load time: accelerate neither
    wraps it in DistributedDataParallel (it refuses DTensor parameters) nor moves it."""
    if isinstance(getattr(type(model), "is_distributed_loading_by_transformers", None), property):
        model._is_distributed_loading_by_transformers = True
    else:
        model.is_distributed_loading_by_transformers = True
