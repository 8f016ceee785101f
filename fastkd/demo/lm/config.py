"""The LM demo's sizes and hyper-parameters: the full run, ``--quick`` and the test's tiny run."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from fastkd._validation import DIVERGENCE_NAMES


@dataclass(frozen=True)
class LMDemoConfig:
    # data and tokenizer
    train_chars: int = 4_000_000
    heldout_chars: int = 400_000
    vocab_size: int = 8192
    seq_len: int = 128
    batch_size: int = 4  # at this scale more, smaller updates learn faster per token
    eval_tokens: int = 65_536
    # models
    teacher_hidden: int = 256
    teacher_layers: int = 4
    student_hidden: int = 128
    student_layers: int = 2
    heads: int = 4
    # training
    teacher_steps: int = 1200
    student_steps: int = 500
    teacher_lr: float = 3e-3
    student_lr: float = 3e-3
    # distillation
    temperature: float = 1.0
    alpha: float = 0.5
    jsd_beta: float = 0.5
    top_k: int = 32
    fused_chunk_size: int = 256
    timing_rounds: int = 5
    seed: int = 0
    # on-policy: prompts are the first prompt_len tokens of a window, continued by completion_len tokens (the
    # student's while it trains; every model's, sampled, for the teacher-NLL metric on sample_prompts
    # held-out prompts)
    prompt_len: int = 32
    completion_len: int = 64
    sample_prompts: int = 64
    onpolicy_divergence: str = "jsd"
    onpolicy_beta: float = 0.5  # TRL's beta: 0.5 is JSD; 1 is reverse KL(student || teacher), slower to learn here

    @classmethod
    def preset(cls, quick: bool = False) -> LMDemoConfig:
        if not quick:
            return cls()
        return cls(train_chars=1_500_000, heldout_chars=200_000, seq_len=64, batch_size=4, eval_tokens=16_384,
                   teacher_hidden=192, teacher_layers=3, teacher_steps=340, student_steps=130,
                   teacher_lr=3e-3, student_lr=3e-3, prompt_len=16, completion_len=32, sample_prompts=32)

    @classmethod
    def tiny(cls) -> LMDemoConfig:
        """Seconds, not minutes: for tests (a small vocabulary, so below the demo's 8192)."""
        return cls(train_chars=150_000, heldout_chars=30_000, vocab_size=512, seq_len=32, batch_size=8,
                   eval_tokens=2048, teacher_hidden=64, teacher_layers=2, student_hidden=32, student_layers=1,
                   heads=2, teacher_steps=40, student_steps=20, fused_chunk_size=64, timing_rounds=1,
                   prompt_len=8, completion_len=8, sample_prompts=8)

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.prompt_len + self.completion_len > self.seq_len:
            raise ValueError(f"prompt_len + completion_len = {self.prompt_len} + {self.completion_len} must be "
                             f"positive and at most seq_len = {self.seq_len} (the models' positions)")
        if self.completion_len < 1 or self.sample_prompts < 1:
            raise ValueError(f"completion_len and sample_prompts must be >= 1, got {self.completion_len} and "
                             f"{self.sample_prompts}")
        # Checked here, not when the on-policy trainer is built after the teacher's minutes of training.
        if self.onpolicy_divergence not in DIVERGENCE_NAMES:
            raise ValueError(f"onpolicy_divergence must be one of {DIVERGENCE_NAMES}, got {self.onpolicy_divergence!r}")
        if not 0.0 <= self.onpolicy_beta <= 1.0:
            raise ValueError(f"onpolicy_beta must be in [0, 1], got {self.onpolicy_beta}")

    def with_overrides(self, **overrides: object) -> LMDemoConfig:
        """A copy with the given fields changed; ``None`` values are ignored (unset command-line options)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown LM demo setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
