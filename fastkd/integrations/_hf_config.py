"""``DistillationConfig``: ``transformers.TrainingArguments`` plus the distillation-loss knobs."""
from dataclasses import dataclass, field

import transformers

from fastkd._validation import DIVERGENCES, resolve_beta

_TAILS = ("renormalize", "bucket")


@dataclass
class DistillationConfig(transformers.TrainingArguments):
    """``transformers.TrainingArguments`` with the loss of :class:`DistillationTrainer`.

    Per supervised token i (its shifted label is not -100), with p = softmax(teacher / T) and
    q = softmax(student / T), the loss is ``alpha * T**2 * D(p, q) + (1 - alpha) * CE(student, label)``
    (:func:`fastkd.distill_loss`; Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"),
    averaged over the supervised tokens of the whole gradient-accumulation window and all processes.
    The names follow TRL's ``GKDConfig`` where they overlap (``temperature``, ``beta``); ``alpha`` is
    the weight of the distillation term.

    Fields added to ``TrainingArguments``:
        temperature: T > 0 (default 2.0).
        alpha: weight of the distillation term in [0, 1] (default 0.5; 1.0 is distillation alone).
        divergence: D, one of ``fastkd.distill_loss``'s: ``"forward_kl"`` (default), ``"reverse_kl"``,
            ``"jsd"``, ``"tvd"``, ``"skew_forward_kl"``, ``"skew_reverse_kl"``.
        beta: the divergence's mixing weight (``jsd``, ``skew_*``); None for its default.
        label_smoothing: epsilon of the hard term in [0, 1) (``label_smoothing_factor`` is not used:
            it must stay 0).
        scale_by_temperature_squared: multiply the distillation term by T**2 (default True).
        fused_linear: compute the loss from the final hidden states and both lm_head weights in row
            chunks (:func:`fastkd.fused_linear_distill_loss`), never materialising the (B, S, V) logits.
        chunk_size: rows per chunk of the fused-linear path (None: fastkd's default).
        vocab_size: the vocabulary the loss runs over: the first ``vocab_size`` entries of the student
            and teacher logits. None: the student's vocabulary; a teacher with a larger (padded)
            vocabulary is sliced to it.
        teacher_topk_indices_column, teacher_topk_logprobs_column: the batch keys of an offline teacher
            (``teacher_model=None``): ``(B, S, K)`` vocabulary indices and T = 1 log-probabilities of
            the teacher's top-k entries at each position (the prediction of the next token, aligned with
            the logits, not with the shifted labels).
        teacher_topk_tail: how the offline teacher's mass outside its top k is treated
            (:class:`fastkd.SparseTeacher`): ``"renormalize"`` (default) or ``"bucket"``.

    ``remove_unused_columns`` defaults to False here, so the data collator keeps the top-k teacher
    columns (which the model's forward does not take).

    Raises:
        ValueError: a knob out of range (named), an unknown divergence, a beta the divergence does not
            take, or ``label_smoothing_factor`` != 0.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature T > 0 of the distillation term."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation term, in [0, 1]."})
    divergence: str = field(
        default="forward_kl",
        metadata={"help": "forward_kl, reverse_kl, jsd, tvd, skew_forward_kl or skew_reverse_kl."},
    )
    beta: float | None = field(
        default=None, metadata={"help": "Mixing weight of jsd / skew_* divergences (None: their default)."}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the hard term, in [0, 1)."})
    scale_by_temperature_squared: bool = field(
        default=True, metadata={"help": "Multiply the distillation term by T^2 (Hinton et al.)."}
    )
    fused_linear: bool = field(
        default=False,
        metadata={"help": "Loss from hidden states and lm_head weights in row chunks, without (B, S, V) logits."},
    )
    chunk_size: int | None = field(default=None, metadata={"help": "Rows per chunk of the fused-linear loss."})
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "Vocabulary of the loss (None: the student's); larger teacher vocabularies are sliced."},
    )
    teacher_topk_indices_column: str = field(
        default="teacher_topk_indices", metadata={"help": "Batch key of the offline teacher's top-k indices."}
    )
    teacher_topk_logprobs_column: str = field(
        default="teacher_topk_logprobs", metadata={"help": "Batch key of the offline teacher's top-k log-probs."}
    )
    teacher_topk_tail: str = field(
        default="renormalize", metadata={"help": "Offline teacher's mass outside the top k: renormalize or bucket."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep columns the model's forward does not take (the offline teacher's)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {self.divergence!r}")
        resolve_beta(self.divergence, self.beta)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.label_smoothing_factor != 0:
            raise ValueError(
                "label_smoothing_factor is not used by DistillationConfig: set label_smoothing "
                f"(the hard term's epsilon) instead, got label_smoothing_factor={self.label_smoothing_factor!r}"
            )
        for name in ("chunk_size", "vocab_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.teacher_topk_tail not in _TAILS:
            raise ValueError(f"teacher_topk_tail must be one of {', '.join(map(repr, _TAILS))}, "
                             f"got {self.teacher_topk_tail!r}")

    def loss_kwargs(self) -> dict:
        """The keywords of :func:`fastkd.distill_loss` / :func:`fastkd.fused_linear_distill_loss` set here."""
        return dict(
            temperature=self.temperature, alpha=self.alpha, divergence=self.divergence, beta=self.beta,
            label_smoothing=self.label_smoothing, scale_by_temperature_squared=self.scale_by_temperature_squared,
        )
