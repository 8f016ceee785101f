"""The on-policy student: it writes completions of training-set prompts, and the teacher scores every token
it wrote, through :class:`fastkd.integrations.trl.DistillationTrainer` (TRL's trainer, fastkd's fused loss).

TRL's ``DistillationTrainer`` generates every batch with the student (fully on-policy, GKD's lambda = 1).
The optimizer and schedule are the off-policy students' (AdamW, betas 0.9 / 0.95, weight decay 0.1, warm-up
over a tenth of the steps, cosine to 10 %, clipping at 1), as are the steps, batch size and initialization.
TRL is optional: :func:`load_trainer` raises ImportError without it."""
from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fastkd.demo.lm.memory import PeakRss
from fastkd.demo.lm.tokenizer import EOS
from fastkd.demo.lm.train import RunStats

NAME = "student_onpolicy"
SKIP_HINT = 'pip install "fastkd[trl]"'


def load_trainer() -> tuple[type, type]:
    """fastkd's (DistillationConfig, DistillationTrainer) for TRL; ImportError without TRL."""
    from fastkd.integrations.trl import DistillationConfig, DistillationTrainer

    return DistillationConfig, DistillationTrainer


def describe(divergence: str, beta: float) -> str:
    loss = {0.0: "forward KL", 1.0: "reverse KL"}.get(beta, f"JSD (beta = {beta})") if divergence == "jsd" \
        else divergence
    return f"distilled on-policy: its own samples scored by the teacher (TRL DistillationTrainer, {loss})"


def hf_tokenizer(tok: Any):
    """The run's ``tokenizers.Tokenizer`` as the transformers tokenizer TRL takes (left padding, EOS pads)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left")


def prompt_texts(tok: Any, batches: torch.Tensor, prompt_len: int) -> list[str]:
    """The first ``prompt_len`` tokens of every training window, as text (TRL tokenizes prompts itself), in
    the order the off-policy students see the windows."""
    windows = batches.reshape(-1, batches.shape[-1])[:, :prompt_len]
    return tok.decode_batch(windows.tolist(), skip_special_tokens=False)


def _callback(on_step: Callable[[int, float], None] | None, stats: RunStats, lengths: list[float]):
    from transformers import TrainerCallback

    class _Steps(TrainerCallback):
        """Per-step wall time (generation included), the logged loss for the progress line, and the mean
        completion length of each step."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            stats.step_times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
            if logs and "loss" in logs:
                stats.final_train_loss = float(logs["loss"])
                if on_step is not None:
                    on_step(state.global_step - 1, stats.final_train_loss)

    return _Steps()


def _use_run_eos(model: torch.nn.Module, eos: int) -> None:
    """The run's end-of-text token ends and pads a completion; there is no beginning-of-sequence token. (A
    fresh LlamaConfig's ids, bos 1 and eos 2, are byte tokens here; transformers' Trainer would align them
    to the tokenizer's itself, with a notice on every run.)"""
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, eos, None


def _quiet(trainer: Any) -> None:
    """No per-step log dictionaries on stdout: the demo prints its own progress line."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _config(config_class: type, out: str, cfg: Any, steps: int) -> Any:
    return config_class(
        output_dir=out, max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.student_lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=max(steps // 10, 1), weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch",
        max_completion_length=cfg.completion_len, temperature=1.0, top_k=0, top_p=1.0,
        divergence=cfg.onpolicy_divergence, beta=cfg.onpolicy_beta, chunk_size=cfg.fused_chunk_size,
        generation_kwargs={"use_cache": True}, shuffle_dataset=False, gradient_checkpointing=False,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=cfg.seed, disable_dropout=True, dataloader_num_workers=0,
    )


def train_onpolicy(student: torch.nn.Module, teacher: torch.nn.Module, tok: Any, batches: torch.Tensor, cfg: Any,
                   on_step: Callable[[int, float], None] | None = None) -> tuple[RunStats, float]:
    """Train ``student`` on-policy for ``len(batches)`` steps from the prompts of ``batches``. Returns the run's
    statistics and the mean number of tokens of its completions (below ``cfg.completion_len`` when samples
    end with the end-of-text token)."""
    import datasets

    config_class, trainer_class = load_trainer()
    prompts = datasets.Dataset.from_dict({"prompt": prompt_texts(tok, batches, cfg.prompt_len)})
    hf_tok = hf_tokenizer(tok)
    _use_run_eos(student, hf_tok.eos_token_id)
    stats, lengths = RunStats(), []
    # transformers' renaming notices (gradient vs activation checkpointing) concern settings left alone here
    with tempfile.TemporaryDirectory() as out, PeakRss() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trainer_class(model=student, teacher_model=teacher,
                                args=_config(config_class, out, cfg, len(batches)), train_dataset=prompts,
                                processing_class=hf_tok, callbacks=[_callback(on_step, stats, lengths)])
        _quiet(trainer)
        start = time.perf_counter()
        trainer.train()
        stats.train_s = time.perf_counter() - start
        del trainer
    stats.peak_rss_bytes = mem.peak_bytes
    student.eval()
    return stats, sum(lengths) / max(len(lengths), 1)
