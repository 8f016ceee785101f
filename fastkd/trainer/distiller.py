"""``fastkd.Distiller``: a teacher trains a student through :class:`fastkd.DistillLoss`, with
checkpoints, bit-exact resume, torchrun / DDP, progress bars, CSV / TensorBoard metrics and plots."""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.loss import DistillLoss
from fastkd.terms import DistillTerms
from fastkd.trainer import distributed
from fastkd.trainer.batches import call_model, count_correct, get_logits, move_to, split_batch
from fastkd.trainer.checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    atomic_copy,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    loader_generators,
    restore_rng_state,
)
from fastkd.trainer.features import FeatureHooks, FeaturePair, check_modules, feature_loss, normalize_pairs
from fastkd.trainer.metrics import EpochMeter, MetricsLogger

LossFn = Callable[..., "torch.Tensor | DistillTerms"]
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_END = object()


def _windows(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive accumulation windows of ``size`` micro-batches (an epoch's last one may be shorter).
    A window is fetched whole before its first forward: its loss is normalised by its supervised-row
    count, which is known only once every target in it has been seen."""
    window: list[Any] = []
    for item in iterable:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


class Distiller:
    """Train ``student`` to imitate ``teacher`` (knowledge distillation).

    Each step runs the teacher (eval mode, no grad, unless ``train_teacher``) and the student on the
    same batch and minimizes ``loss_fn(student_logits, teacher_logits, target)`` plus, with
    ``feature_pairs``, the weighted MSE between intermediate features.

    Args:
        teacher: the trained ("hot") model. Its weights are left alone unless ``train_teacher``.
        student: the model to train. Must predict the same number of classes as the teacher (see
            ``trim_teacher_vocab``).
        loss_fn: defaults to ``DistillLoss(temperature=4.0, alpha=0.9)``; any callable
            ``(student_logits, teacher_logits, target) -> loss or DistillTerms`` works.
        optimizer: defaults to Adam (lr 1e-3) over the trainable parameters (student, projectors,
            and the teacher when ``train_teacher``).
        scheduler: an LR scheduler, stepped every epoch (or every optimizer step with
            ``scheduler_interval="step"``); ReduceLROnPlateau gets the validation (else train) loss.
        device: defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
        amp: None, ``"bf16"`` or ``"fp16"`` (autocast; fp16 adds a GradScaler).
        grad_accum_steps: micro-batches per optimizer step; an epoch's leftover micro-batches are
            stepped at its end, so every checkpoint sits on a step boundary. A step's gradient is that
            of one big batch of the window's micro-batches (every rank's, under torchrun): the loss is
            normalised by the window's count of supervised rows (target != ignore_index) rather than
            averaged over micro-batches. This needs ``loss_fn``'s ``reduction`` attribute (``"mean"``:
            over the rows whose target is not ``ignore_index``, ``"batchmean"`` or ``"sum"``, as
            DistillLoss has); a loss_fn without one has its micro-batches weigh the same.
        max_grad_norm: clip the gradient norm to this before each step.
        train_teacher: online (mutual) distillation: the teacher trains too, on the labels
            (cross-entropy) and on the distillation loss through the kernel's teacher gradient.
        feature_pairs: hint losses, a list of :class:`FeaturePair` or tuples
            ``(student_module, teacher_module[, projector[, weight]])``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        shift_labels: causal language models: the logits at position i are scored against the label
            at position i + 1 (``logits[..., :-1, :]`` against ``labels[..., 1:]``, as Hugging Face
            transformers does), for the loss, the accuracy and the supervised-token counts. Needs
            ``(batch, sequence, vocab)`` logits.
        trim_teacher_vocab: a teacher whose output layer is padded beyond the student's vocabulary
            (e.g. rounded up to a multiple of 64) is distilled over its first ``V_student`` logits
            (a view, no copy). Off by default, so that a class-count mismatch stays an error.

    Under ``torchrun`` the student (and a trained teacher) is wrapped in DistributedDataParallel, the
    training loader is re-sharded with a DistributedSampler, metrics are all-reduced, and only rank 0
    writes files and shows progress bars.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        *,
        device: str | torch.device | None = None,
        amp: str | None = None,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        train_teacher: bool = False,
        feature_pairs: Iterable[Any] | None = None,
        scheduler_interval: str = "epoch",
        shift_labels: bool = False,
        trim_teacher_vocab: bool = False,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if teacher is student:
            raise ValueError("teacher and student must be different modules")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if amp not in (None, *_AMP_DTYPES):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or a number > 0, got {max_grad_norm!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        if scheduler is not None and optimizer is None:
            raise ValueError("scheduler needs the optimizer it schedules: pass optimizer= as well")

        self.dist = distributed.init_distributed(torch.device(device) if device is not None else None)
        self.device = self._resolve_device(device)
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        self.loss_fn = loss_fn if loss_fn is not None else DistillLoss(temperature=4.0, alpha=0.9)
        self.amp = amp
        self.grad_accum_steps = grad_accum_steps
        self.shift_labels = bool(shift_labels)
        self.trim_teacher_vocab = bool(trim_teacher_vocab)
        self.max_grad_norm = max_grad_norm
        self.train_teacher = bool(train_teacher)
        self.feature_pairs: list[FeaturePair] = normalize_pairs(feature_pairs)
        self.projectors = nn.ModuleList(
            [p.projector for p in self.feature_pairs if p.projector is not None]
        ).to(self.device)
        # The hooks live only while fit() runs, so the user's models come back without them.
        self._student_hooks: FeatureHooks | None = None
        self._teacher_hooks: FeatureHooks | None = None
        check_modules(self.student, [p.student for p in self.feature_pairs], "student")
        check_modules(self.teacher, [p.teacher for p in self.feature_pairs], "teacher")

        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(self._trainable(), lr=1e-3)
        self._check_optimizer_covers_projectors()
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer steps
        self.history: list[dict[str, Any]] = []
        self.best: float = math.inf
        self.data_seed: int | None = None  # DistributedSampler seed, fixed at the first fit()
        self._student_train = self.student  # DDP-wrapped in fit() when distributed
        self._teacher_train = self.teacher

    # ------------------------------------------------------------------ setup helpers
    def _resolve_device(self, device: str | torch.device | None) -> torch.device:
        if device is None:
            if torch.cuda.is_available():
                return torch.device("cuda", self.dist.local_rank)
            return torch.device("cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.dist.local_rank if self.dist.enabled else torch.cuda.current_device())
        return dev

    def _trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.projectors.parameters() if p.requires_grad]
        if self.train_teacher:
            params += [p for p in self.teacher.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters (requires_grad is False everywhere)")
        return params

    def _check_optimizer_covers_projectors(self) -> None:
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.projectors.parameters() if p.requires_grad and id(p) not in in_opt]
        if missing:
            warnings.warn(
                "feature_pairs: the optimizer does not hold the projectors' parameters, so they will not "
                "train; add them (e.g. distiller.projectors.parameters()) to your optimizer",
                UserWarning, stacklevel=3,
            )

    def _wrap_ddp(self) -> None:
        if not self.dist.enabled or self._student_train is not self.student:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._student_train = DDP(self.student, device_ids=ids)
        if self.train_teacher:
            self._teacher_train = DDP(self.teacher, device_ids=ids)

    @property
    def ignore_index(self) -> int:
        return int(getattr(self.loss_fn, "ignore_index", -100))

    @property
    def reduction(self) -> str | None:
        """How ``loss_fn`` reduces rows (its ``reduction`` attribute), None when it does not say."""
        reduction = getattr(self.loss_fn, "reduction", None)
        return reduction if reduction in ("mean", "batchmean", "sum") else None

    # ------------------------------------------------------------------ accumulation windows
    def _f64(self, value: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value).to(self.device, torch.float64)

    def _window_scales(self, window: list[Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For each micro-batch, the factor that turns its reduced loss into its share of the window's
        loss as one big batch over every rank; and the all-reduced supervised-row count of the window
        (the divisor of the teacher's cross-entropy row sums).

        A "mean" loss is its row sum over its supervised rows, a "batchmean" one over its batch size:
        each micro-batch is weighted by its own divisor over the window's. Micro-batches weigh the
        same when the divisor is unknown: a loss_fn without a ``reduction`` attribute, or batches
        without targets (their rows are counted only by the forward). DDP averages gradients over
        ranks, hence the factor world_size."""
        world = float(self.dist.world_size)
        targets = [self._shift(split_batch(b)[1]) for b in window]
        labelled = all(t is not None for t in targets)
        supervised = [(t != self.ignore_index).sum() for t in targets if t is not None]
        if not labelled or self.reduction is None:
            units = [self._f64(1.0) for _ in window]
        elif self.reduction == "batchmean":
            units = [self._f64(t.shape[0] if t.dim() >= 1 else 1) for t in targets]
        else:
            units = [self._f64(n) for n in supervised]
        totals = torch.stack([torch.stack(units).sum(), self._f64(sum(supervised, torch.zeros((), dtype=torch.long)))])
        totals = distributed.all_reduce_sum(totals)  # every rank, every window: one small collective
        if self.reduction == "sum":
            scales = [self._f64(world) for _ in window]  # the window's sum is the sum of its parts
        else:
            scales = [u * world / totals[0].clamp(min=1.0) for u in units]
        return scales, totals[1].clamp(min=1.0) / world

    # ------------------------------------------------------------------ one batch
    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AMP_DTYPES[self.amp])

    def _forward(self, batch: Any, *, training: bool) -> dict[str, Any]:
        """Run both models and the loss on one batch; returns the total loss and what gets logged."""
        inputs, target = split_batch(move_to(batch, self.device))
        student = self._student_train if training else self.student
        with self._autocast():
            if training and self.train_teacher:
                t_logits = get_logits(call_model(self._teacher_train, inputs), "teacher")
            else:
                with torch.no_grad():
                    t_logits = get_logits(call_model(self.teacher, inputs), "teacher")
            s_logits = get_logits(call_model(student, inputs), "student")
        s_logits, t_logits, target = self._align(s_logits, t_logits, target)
        out = self.loss_fn(s_logits, t_logits, target, return_terms=True) if isinstance(
            self.loss_fn, DistillLoss) else self.loss_fn(s_logits, t_logits, target)
        if isinstance(out, DistillTerms):
            loss, soft, hard = out.loss, out.soft, out.hard
        else:
            loss, soft, hard = out, None, None
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar loss, got {shape}; use reduction='mean', 'sum' or 'batchmean'"
            )
        feat = None
        if self._student_hooks is not None and self._teacher_hooks is not None:
            if training:
                feat = feature_loss(self.feature_pairs, self._student_hooks, self._teacher_hooks)
            self._student_hooks.clear()
            self._teacher_hooks.clear()
        teacher_ce = None
        if training and self.train_teacher and target is not None:
            # The teacher learns from the labels; the distillation loss adds the kernel's teacher gradient.
            # A row sum: the caller divides it by the window's supervised-row count.
            teacher_ce = F.cross_entropy(
                t_logits.float().reshape(-1, t_logits.shape[-1]), target.reshape(-1), reduction="sum",
                ignore_index=self.ignore_index, label_smoothing=float(getattr(self.loss_fn, "label_smoothing", 0.0)),
            )
        correct, counted = count_correct(s_logits, target, self.ignore_index)
        rows = s_logits.shape[:-1].numel()
        # Metrics are per-token means: row sums over supervised rows (all rows without a target).
        items: torch.Tensor | int = (target != self.ignore_index).sum() if target is not None else rows
        if self.reduction == "mean":
            factor = items
        elif self.reduction == "batchmean":
            factor = s_logits.shape[0] if s_logits.dim() > 1 else 1
        elif self.reduction == "sum":
            factor = 1
        else:  # a loss_fn that does not say how it reduces: its value stands for each of the batch's rows
            factor = items = rows
        return {"loss": loss, "soft": soft, "hard": hard, "feature": feat, "teacher_ce": teacher_ce,
                "correct": correct, "counted": counted, "rows": rows, "items": items,
                "sums": [_row_sum(v, factor) for v in (loss, soft, hard)]}

    def _align(
        self, s: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Check the logits and the target against each other, then apply ``trim_teacher_vocab`` and
        ``shift_labels``; returns what the loss sees."""
        n_t, n_s = t.shape[-1], s.shape[-1]
        if n_t > n_s and self.trim_teacher_vocab:
            t = t[..., :n_s]  # a view: the padded outputs are never read
        elif n_t != n_s:
            shapes = f"(teacher logits {tuple(t.shape)}, student logits {tuple(s.shape)})"
            if n_t < n_s:
                hint = (f"give the student a {n_t}-way output layer (trim_teacher_vocab only drops teacher "
                        "outputs beyond the student's; it cannot add any)")
            else:
                hint = (f"if the teacher's extra outputs are padding of its vocabulary (e.g. rounded up to a "
                        f"multiple of 64), pass trim_teacher_vocab=True to distill over its first {n_s}; "
                        f"otherwise give the student a {n_t}-way output layer")
            raise ValueError(
                f"the teacher predicts {n_t} classes but the student predicts {n_s} {shapes}: distillation "
                f"needs both models to output the same classes; {hint}"
            )
        self._check_logits(s, t, target)
        if self.shift_labels:
            if s.dim() < 3:
                raise ValueError(
                    f"shift_labels=True needs (batch, sequence, vocab) logits, got student logits {tuple(s.shape)}"
                )
            # Position i predicts token i + 1: the last position has no label, the first label no logits.
            s, t = s[..., :-1, :], t[..., :-1, :]
            target = self._shift(target)
        return s, t, target

    def _shift(self, target: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the loss sees: ``target[..., 1:]`` with ``shift_labels``."""
        if self.shift_labels and target is not None and target.dim() >= 2:
            return target[..., 1:]
        return target

    def _check_logits(self, s: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None) -> None:
        if s.shape != t.shape:
            raise ValueError(
                f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in shape"
            )
        if target is not None and tuple(target.shape) != tuple(s.shape[:-1]):
            raise ValueError(
                f"the batch's target has shape {tuple(target.shape)} but the logits have shape "
                f"{tuple(s.shape)}; target must have the logits' leading shape {tuple(s.shape[:-1])}"
            )

    def _preflight(self, loader: Any) -> None:
        """Run the first batch through both models and the loss before any weight changes, so that a
        class-count mismatch or a bad batch fails at once. Leaves every RNG as it found it (the
        bit-exact resume depends on that) and the models' train/eval modes too."""
        gens = loader_generators(loader)
        rng, gen_states = capture_rng_state(), [g.get_state() for g in gens]
        modes = [(m, m.training) for m in (self.teacher, self.student, self.projectors)]
        try:
            batch = next(iter(loader), _END)
            if batch is _END:
                raise ValueError("train_loader is empty")
            for m, _ in modes:
                m.eval()
            with torch.no_grad():
                out = self._forward(batch, training=False)
                if self.feature_pairs:  # eval skips the feature loss; check the shapes here once
                    self._forward_features_only(batch)
            if not torch.isfinite(out["loss"]).all():
                warnings.warn("the loss of the first batch is not finite", RuntimeWarning, stacklevel=3)
        finally:
            for m, mode in modes:
                m.train(mode)
            restore_rng_state(rng)
            for g, s in zip(gens, gen_states, strict=True):
                g.set_state(s)

    def _attach_hooks(self) -> None:
        if self.feature_pairs and self._student_hooks is None:
            self._student_hooks = FeatureHooks(self.student, [p.student for p in self.feature_pairs], "student")
            self._teacher_hooks = FeatureHooks(self.teacher, [p.teacher for p in self.feature_pairs], "teacher")

    def _detach_hooks(self) -> None:
        for hooks in (self._student_hooks, self._teacher_hooks):
            if hooks is not None:
                hooks.remove()
        self._student_hooks = self._teacher_hooks = None

    def _forward_features_only(self, batch: Any) -> None:
        assert self._student_hooks is not None and self._teacher_hooks is not None
        inputs, _ = split_batch(move_to(batch, self.device))
        with self._autocast():
            call_model(self.teacher, inputs)
            call_model(self.student, inputs)
        try:
            feature_loss(self.feature_pairs, self._student_hooks, self._teacher_hooks)
        finally:
            self._student_hooks.clear()
            self._teacher_hooks.clear()

    # ------------------------------------------------------------------ optimizer step
    def _optimizer_step(self) -> None:
        if self.dist.enabled and len(self.projectors) > 0:
            # Projectors live outside the DDP-wrapped student, so average their gradients by hand.
            for p in self.projectors.parameters():
                if p.grad is not None:
                    distributed.all_reduce_sum(p.grad)
                    p.grad /= self.dist.world_size
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()

    def _step_scheduler_epoch(self, metric: float) -> None:
        if self.scheduler is None or self.scheduler_interval != "epoch":
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, except the RNG states (see :meth:`save_checkpoint`)."""
        return {
            "format": FORMAT_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.train_teacher else None,
            "projectors": self.projectors.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": list(self.history),
            "best": self.best,
            "data_seed": self.data_seed,
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self, path: str | os.PathLike, loader: Any = None) -> None:
        """Atomically write a checkpoint with every rank's RNG states (a collective under torchrun:
        call it on every rank; only rank 0 writes)."""
        ckpt = self.state_dict()
        rng = capture_rng_state()
        rng["loader_generators"] = [g.get_state() for g in loader_generators(loader)] if loader is not None else []
        ckpt["rng"] = distributed.all_gather_object(rng)
        if self.dist.is_main:
            atomic_save(ckpt, path)

    def load_checkpoint(self, path: str | os.PathLike, loader: Any = None, *, restore_rng: bool = True) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (models, optimizer, scheduler, grad
        scaler, epoch, step, history and, with ``restore_rng``, this rank's RNG states)."""
        ckpt = load_checkpoint(path, map_location="cpu")
        self.student.load_state_dict(ckpt["student"])
        if ckpt["teacher"] is not None:
            self.teacher.load_state_dict(ckpt["teacher"])
        self.projectors.load_state_dict(ckpt["projectors"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.best = float(ckpt["best"])
        self.data_seed = ckpt.get("data_seed")
        if restore_rng:
            states = ckpt["rng"]
            # A different world size on resume: ranks beyond the saved ones reuse saved states.
            state = states[self.dist.rank % len(states)]
            restore_rng_state(state)
            gens = loader_generators(loader) if loader is not None else []
            for g, s in zip(gens, state.get("loader_generators", []), strict=False):
                g.set_state(s)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Loss (the training objective, without feature hints) and student top-1 accuracy on
        ``loader``, plus the ``soft`` and ``hard`` terms when the loss reports them. The loss and its
        terms are per-token means: the sum of the per-row losses over the count of supervised rows
        (target != ignore_index), whatever the batch sizes and masks. Under torchrun every rank
        evaluates its shard and the sums and counts are all-reduced.

        Evaluation leaves the RNG states as it found them (a DataLoader draws a seed from the global
        RNG each time it is iterated), so validating or not never changes a training run."""
        loader = distributed.shard_eval_loader(loader, self.dist)
        modes = [(m, m.training) for m in (self.teacher, self.student)]
        for m, _ in modes:
            m.eval()
        meter = EpochMeter(self.device)
        rng = capture_rng_state()
        try:
            for batch in loader:
                meter.update(self._forward(batch, training=False))
        finally:
            restore_rng_state(rng)
            for m, mode in modes:
                m.train(mode)
        return meter.compute()

    def fit(
        self,
        train_loader: Iterable[Any],
        epochs: int,
        *,
        val_loader: Iterable[Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool | str | os.PathLike = False,
        log_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in total and return the history, one dict per epoch
        (``epoch``, ``step``, ``lr``, ``train_loss``, ``train_accuracy``, ``train_soft``, ``train_hard``,
        ``val_loss``, ``val_accuracy``, ..., ``time_s``).

        Args:
            train_loader: batches of ``(inputs, target)`` or dicts; re-sharded under torchrun.
            epochs: the total number of epochs. A resumed (or already trained) Distiller that has done
                k epochs trains ``epochs - k`` more.
            val_loader: evaluated after every epoch.
            checkpoint_dir: writes ``last.pt`` after every epoch and ``best.pt`` when the validation
                loss (the train loss without a val_loader) improves, both atomically.
            resume: True restores ``checkpoint_dir/last.pt`` when it exists (and starts fresh when it
                does not), a path restores that file. The resumed run's weights equal, bit for bit on
                the CPU, those of a run that never stopped.
            log_dir: writes ``metrics.csv``, TensorBoard events when tensorboard is installed, and
                ``curves.png``.
            progress: tqdm bars for epochs and batches (rank 0 only).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if resume is True and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where last.pt is), or pass resume=<path>")
        ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        main = self.dist.is_main

        if resume:
            path = ckpt_dir / LAST if resume is True else Path(resume)
            if path.is_file():
                self.load_checkpoint(path, train_loader)
            elif resume is not True:
                raise FileNotFoundError(f"resume: no checkpoint at {path}")
            elif main:
                warnings.warn(f"resume: no checkpoint at {path} yet, starting from scratch", stacklevel=2)
        if self.data_seed is None:
            # The DistributedSampler's shuffling seed: one for all ranks, kept in the checkpoints so
            # that a resumed run shuffles as the original did.
            self.data_seed = distributed.broadcast_object(int(torch.initial_seed()) % 2**31)
        loader = distributed.shard_train_loader(train_loader, self.dist, self.data_seed)

        self._attach_hooks()
        try:
            return self._fit_loop(loader, train_loader, epochs, val_loader, ckpt_dir, log_dir, progress)
        finally:
            self._detach_hooks()

    def _fit_loop(self, loader: Iterable[Any], train_loader: Iterable[Any], epochs: int,
                  val_loader: Iterable[Any] | None, ckpt_dir: Path | None, log_dir: str | os.PathLike | None,
                  progress: bool) -> list[dict[str, Any]]:
        main = self.dist.is_main
        self._preflight(loader)
        self._wrap_ddp()
        logger = MetricsLogger(log_dir) if (log_dir is not None and main) else None
        bars = progress and main
        epoch_bar = None
        if bars and self.epoch < epochs:
            from tqdm.auto import tqdm

            epoch_bar = tqdm(total=epochs, initial=self.epoch, desc="epochs", unit="epoch", dynamic_ncols=True)
        try:
            while self.epoch < epochs:
                sampler = getattr(loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(self.epoch)  # a different shuffle every epoch, same on every rank
                row = self._train_epoch(loader, show_bar=bars)
                if val_loader is not None:
                    row.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
                self.epoch += 1
                row = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"], **row}
                self._step_scheduler_epoch(row.get("val_loss", row["train_loss"]))
                self.history.append(row)
                monitored = row.get("val_loss", row["train_loss"])
                improved = monitored < self.best
                if improved:
                    self.best = monitored
                if ckpt_dir is not None:
                    self.save_checkpoint(ckpt_dir / LAST, train_loader)
                    if improved and main:
                        atomic_copy(ckpt_dir / LAST, ckpt_dir / BEST)
                if logger is not None:
                    logger.log_epoch(self.history)
                if epoch_bar is not None:
                    epoch_bar.update(1)
                    epoch_bar.set_postfix(_postfix(row))
        finally:
            if epoch_bar is not None:
                epoch_bar.close()
            if logger is not None:
                logger.close()
        if log_dir is not None and main and self.history:
            from fastkd.trainer.plots import plot_history

            plot_history(self.history, Path(log_dir) / "curves.png")
        distributed.barrier()  # files written by rank 0 exist for every rank once fit returns
        return [dict(r) for r in self.history]

    def _train_epoch(self, loader: Iterable[Any], show_bar: bool) -> dict[str, float]:
        start = time.perf_counter()
        self.student.train()
        self.projectors.train()
        if self.train_teacher:
            self.teacher.train()
        else:
            self.teacher.eval()
        meter = EpochMeter(self.device)
        bar = None
        if show_bar:
            from tqdm.auto import tqdm

            total = len(loader) if hasattr(loader, "__len__") else None
            bar = tqdm(total=total, desc=f"epoch {self.epoch + 1}", unit="batch", leave=False, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        i = 0
        try:
            for window in _windows(loader, self.grad_accum_steps):
                scales, ce_divisor = self._window_scales(window)
                for j, batch in enumerate(window):
                    sync = j == len(window) - 1
                    with contextlib.ExitStack() as stack:
                        if not sync:  # accumulate locally; DDP all-reduces on the micro-batch that steps
                            for m in (self._student_train, self._teacher_train):
                                if hasattr(m, "no_sync"):
                                    stack.enter_context(m.no_sync())
                        out = self._forward(batch, training=True)
                        total = out["loss"] * scales[j].to(out["loss"].dtype)
                        if out["feature"] is not None:  # a per-micro-batch mean: averaged over the window
                            total = total + out["feature"] / len(window)
                        if out["teacher_ce"] is not None:
                            total = total + out["teacher_ce"] / ce_divisor.to(out["teacher_ce"].dtype)
                        (self.scaler.scale(total) if self.scaler is not None else total).backward()
                    meter.update(out)
                    if bar is not None:
                        bar.update(1)
                        if i % 10 == 0:
                            bar.set_postfix(_postfix(meter.peek()))
                    i += 1
                self._optimizer_step()
            if bar is not None:
                bar.set_postfix(_postfix(meter.peek()))
        finally:
            if bar is not None:
                bar.close()
        stats = meter.compute()
        row = {f"train_{k}": v for k, v in stats.items()}
        row["time_s"] = time.perf_counter() - start
        return row


def _row_sum(value: torch.Tensor | None, factor: torch.Tensor | int) -> torch.Tensor | None:
    """A reduced loss times its divisor, detached; 0 (not NaN) for a batch without supervised rows."""
    if value is None:
        return None
    v = value.detach().double()
    f = torch.as_tensor(factor, dtype=torch.float64).to(v.device)
    return torch.where(f > 0, v * f, torch.zeros_like(v))


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    """Loss and accuracy for a tqdm postfix, from a history row or running averages."""
    out = {}
    for short, keys in (("loss", ("train_loss", "loss")), ("acc", ("train_accuracy", "accuracy")),
                        ("val_loss", ("val_loss",)), ("val_acc", ("val_accuracy",))):
        for key in keys:
            value = row.get(key)
            if isinstance(value, float) and not math.isnan(value):
                out[short] = f"{value:.4f}"
                break
    return out
