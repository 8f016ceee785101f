"""``fastkd demo lm``: data, tokenizer, teacher, students, report."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fastkd
from fastkd.demo.lm import onpolicy
from fastkd.demo.lm import train as T
from fastkd.demo.lm.config import LMDemoConfig
from fastkd.demo.lm.data import batch_starts, eval_windows, gather_windows, load_corpus
from fastkd.demo.lm.memory import METHOD as MEMORY_METHOD
from fastkd.demo.lm.models import build_llama, count_params
from fastkd.demo.lm.sampling import SAMPLING, eval_prompts, sample_nll
from fastkd.demo.lm.tokenizer import encode_stream, train_tokenizer


def _require_hf() -> None:
    missing = [m for m in ("transformers", "tokenizers") if _absent(m)]
    if missing:
        raise SystemExit(f"fastkd demo lm needs {' and '.join(missing)}: pip install \"fastkd[hf]\"")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


class _Progress:
    """One line per phase on stderr, updated in place while a model trains."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def phase(self, text: str) -> None:
        if self.enabled:
            print(f"\r[{time.perf_counter() - self.start:6.1f} s] {text}", file=sys.stderr, flush=True)

    def stepper(self, name: str, steps: int):
        def on_step(step: int, loss: float) -> None:
            if self.enabled and (step + 1 == steps or step % 10 == 0):
                end = "\n" if step + 1 == steps else ""
                print(f"\r[{time.perf_counter() - self.start:6.1f} s] {name}: step {step + 1}/{steps} "
                      f"loss {loss:.3f}", end=end, file=sys.stderr, flush=True)
        return on_step


def _skip_onpolicy(names: tuple[str, ...]) -> dict[str, str]:
    """``{name: why}`` for the on-policy student when TRL cannot be imported (one line on stderr, always)."""
    if onpolicy.NAME not in names:
        return {}
    try:
        onpolicy.load_trainer()
    except ImportError as e:
        why = f"needs TRL ({onpolicy.SKIP_HINT}): {e}"
        print(f"fastkd demo lm: skipping {onpolicy.NAME}, {why}", file=sys.stderr, flush=True)
        return {onpolicy.NAME: why}
    return {}


def _student_loss(name: str, teacher: torch.nn.Module, cfg: LMDemoConfig,
                  cache: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[T.LossFn, dict[str, Any]]:
    """The loss of student ``name`` and the settings to report with it."""
    kd: dict[str, Any] = {"temperature": cfg.temperature, "alpha": cfg.alpha, "divergence": "forward_kl"}
    if name == "student_scratch":
        return T.cross_entropy_loss(), {}
    if name == "student_distilled":
        return T.dense_distill_loss(teacher, cfg.temperature, cfg.alpha, "forward_kl"), kd
    if name == "student_jsd":
        return (T.dense_distill_loss(teacher, cfg.temperature, cfg.alpha, "jsd", cfg.jsd_beta),
                {**kd, "divergence": "jsd", "beta": cfg.jsd_beta})
    if name == "student_topk":
        assert cache is not None
        return T.topk_distill_loss(cache, cfg.temperature, cfg.alpha), {**kd, "top_k": cfg.top_k, "tail": "bucket"}
    return (T.fused_distill_loss(teacher, cfg.temperature, cfg.alpha, cfg.fused_chunk_size),
            {**kd, "chunk_size": cfg.fused_chunk_size})


def run_lm_demo(out: str | os.PathLike = "demo-output", *, quick: bool = False,
                config: LMDemoConfig | None = None, progress: bool = True, threads: int | None = None,
                students: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Train a Llama-style teacher on the Python standard library's source, then the same student several
    ways (same steps, batches and initialization), and write ``out/report.json``, ``out/report.md`` and
    ``out/perplexity.png``. Returns the report.

    ``threads``: torch CPU threads (None: torch's default). ``students``: a subset of
    :data:`fastkd.demo.lm.train.STUDENTS` and ``"student_onpolicy"`` (default: all; the on-policy one is
    skipped with a message when TRL is not installed)."""
    from fastkd.demo.lm.report import write_report

    _require_hf()
    start = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = config if config is not None else LMDemoConfig.preset(quick=quick)
    known = (*T.STUDENTS, onpolicy.NAME)
    names = known if students is None else students
    unknown = [s for s in names if s not in known]
    if unknown:
        raise ValueError(f"unknown student(s) {unknown}; choose from {list(known)}")
    skipped = _skip_onpolicy(names)
    names = tuple(n for n in names if n not in skipped)
    off_policy = tuple(n for n in names if n in T.STUDENTS)
    say = _Progress(progress)
    timings: dict[str, float] = {}

    say.phase("reading the standard library's source")
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.train_chars, cfg.heldout_chars)
    tok = train_tokenizer(corpus.train, cfg.vocab_size)
    train_stream = encode_stream(tok, corpus.train)
    heldout_stream = encode_stream(tok, corpus.heldout)
    timings["data_and_tokenizer_s"] = time.perf_counter() - t0
    vocab = tok.get_vocab_size()
    heldout = eval_windows(heldout_stream, cfg.seq_len, cfg.eval_tokens)
    prompts = eval_prompts(heldout, cfg.sample_prompts, cfg.prompt_len)

    def batches(steps: int, seed: int) -> torch.Tensor:
        starts = batch_starts(len(train_stream), cfg.seq_len, steps, cfg.batch_size, seed)
        return gather_windows(train_stream, starts, cfg.seq_len)

    models: dict[str, dict[str, Any]] = {}

    def record(key: str, model: torch.nn.Module, stats: T.RunStats, description: str, **extra: Any) -> None:
        evaluation = T.perplexity(model, heldout, cfg.batch_size)
        t0 = time.perf_counter()
        samples = sample_nll(model, teacher, prompts, cfg.completion_len, cfg.seed + 4)
        timings["sample_metric_s"] = timings.get("sample_metric_s", 0.0) + time.perf_counter() - t0
        models[key] = {
            "description": description, "params": count_params(model),
            "perplexity": evaluation["perplexity"], "heldout_cross_entropy": evaluation["cross_entropy"],
            "final_train_loss": stats.final_train_loss, "steps": len(stats.step_times),
            "step_ms": stats.step_ms, "train_s": stats.train_s,
            "peak_rss_mib": None if stats.peak_rss_bytes is None else stats.peak_rss_bytes / 2**20,
            "sample_teacher_nll": samples["teacher_nll"], "sample_own_nll": samples["own_nll"],
            **extra,
        }
        say.phase(f"{key}: held-out perplexity {evaluation['perplexity']:.2f}, teacher NLL of its samples "
                  f"{samples['teacher_nll']:.3f}")

    # The teacher: bigger, longer, cross-entropy only, on its own batches.
    teacher = build_llama(vocab, cfg.teacher_hidden, cfg.teacher_layers, cfg.heads, cfg.seq_len, cfg.seed)
    stats = T.train(teacher, batches(cfg.teacher_steps, cfg.seed + 1), T.cross_entropy_loss(), cfg.teacher_lr,
                    say.stepper("teacher", cfg.teacher_steps))
    teacher.requires_grad_(False)  # frozen from here on: no teacher gradient in any student's loss
    record("teacher", teacher, stats, "teacher, cross-entropy")

    student_batches = batches(cfg.student_steps, cfg.seed + 2)
    cache = None
    if "student_topk" in names:
        # Offline distillation: the teacher runs once over the students' batches, ahead of training.
        t0 = time.perf_counter()
        cache = T.topk_cache(teacher, student_batches, cfg.top_k)
        timings["topk_cache_s"] = time.perf_counter() - t0

    def new_student() -> torch.nn.Module:
        return build_llama(vocab, cfg.student_hidden, cfg.student_layers, cfg.heads, cfg.seq_len, cfg.seed + 3)

    for name in off_policy:
        loss_fn, extra = _student_loss(name, teacher, cfg, cache)
        if name == "student_topk" and cache is not None:
            extra.update(cache_s=timings["topk_cache_s"],
                         cache_mib=sum(t.numel() * t.element_size() for t in cache) / 2**20)
        student = new_student()
        stats = T.train(student, student_batches, loss_fn, cfg.student_lr, say.stepper(name, cfg.student_steps))
        record(name, student, stats, T.STUDENTS[name], **extra)
        del student, loss_fn

    if onpolicy.NAME in names:
        student = new_student()
        stats, completion_tokens = onpolicy.train_onpolicy(student, teacher, tok, student_batches, cfg,
                                                           say.stepper(onpolicy.NAME, cfg.student_steps))
        record(onpolicy.NAME, student, stats, onpolicy.describe(cfg.onpolicy_divergence, cfg.onpolicy_beta),
               divergence=cfg.onpolicy_divergence, beta=cfg.onpolicy_beta, temperature=1.0,
               prompt_len=cfg.prompt_len, completion_len=cfg.completion_len,
               mean_completion_tokens=completion_tokens)
        del student

    if cfg.timing_rounds and off_policy:
        say.phase(f"timing the students' steps round-robin ({cfg.timing_rounds} rounds)")
        runs = {name: (new_student(), _student_loss(name, teacher, cfg, cache)[0]) for name in off_policy}
        for name, ms in T.interleaved_step_ms(runs, student_batches, cfg.timing_rounds, cfg.student_lr).items():
            models[name]["train_step_ms"] = models[name]["step_ms"]
            models[name]["step_ms"] = ms
        del runs

    if "student_scratch" in models:
        models["student_hard_labels"] = dict(models["student_scratch"])
    meta = {
        "config": cfg.as_dict(), "quick": quick,
        "data": {
            "source": f"Python {platform.python_version()} standard library source files (*.py) under "
                      f"{corpus.root}, split by file (crc32 of the path)",
            "train_files": corpus.train_files, "heldout_files": corpus.heldout_files,
            "train_chars": corpus.train_chars, "heldout_chars": corpus.heldout_chars,
            "train_tokens": len(train_stream), "heldout_tokens_total": len(heldout_stream),
            "heldout_tokens_scored": int(heldout.shape[0] * (heldout.shape[1] - 1)),
        },
        "tokenizer": {"kind": "byte-level BPE (Hugging Face tokenizers), trained on the train split",
                      "vocab_size": vocab},
        "memory_method": MEMORY_METHOD,
        "sample_metric": {"prompts": int(prompts.shape[0]), "prompt_tokens": cfg.prompt_len,
                          "new_tokens": cfg.completion_len, "sampling": SAMPLING,
                          "source": "prompts: the starts of evenly spaced held-out windows; sample_teacher_nll: "
                                    "the teacher's mean per-token NLL (nats) of the model's samples; "
                                    "sample_own_nll: the model's own"},
        "skipped": skipped,
        "step_time_method": "median wall time of a training step (forward, loss, backward, clipping, AdamW); "
                            "students: timed round-robin on fresh copies after training (step_ms; "
                            "train_step_ms is the median during the student's own run), so load from other "
                            "processes falls on all alike; dense and fused students include the frozen "
                            "teacher's forward, the offline one does not; the on-policy student's is the median "
                            "of its own run (generation included), it is not in the round-robin",
        "threads": torch.get_num_threads(), "device": f"cpu ({os.cpu_count()} cores visible)",
        "torch": torch.__version__, "fastkd": fastkd.__version__,
        "timings": timings,
    }
    meta["total_s"] = time.perf_counter() - start
    report = {**models, "meta": meta}
    write_report(report, Path(out))
    say.phase(f"wrote {Path(out) / 'report.md'}, report.json and perplexity.png")
    return report
