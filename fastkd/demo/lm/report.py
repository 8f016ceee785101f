"""report.json, report.md and the perplexity bar chart of the LM demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ORDER = ("teacher", "student_scratch", "student_distilled", "student_jsd", "student_topk", "student_fused",
         "student_onpolicy")


def _models(report: dict[str, Any]) -> list[str]:
    return [k for k in ORDER if k in report]


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    cfg = meta["config"]
    lines = [
        "# fastkd LM demo: distilling a Llama-style teacher on Python's standard library",
        "",
        f"Data: {meta['data']['source']}; {meta['data']['train_files']} training files "
        f"({meta['data']['train_tokens']:,} tokens), {meta['data']['heldout_files']} held-out files "
        f"({meta['data']['heldout_tokens_scored']:,} tokens scored). Tokenizer: {meta['tokenizer']['kind']}, "
        f"{meta['tokenizer']['vocab_size']} entries.",
        "",
        f"Teacher: hidden {cfg['teacher_hidden']}, {cfg['teacher_layers']} layers, {cfg['teacher_steps']} steps. "
        f"Students: hidden {cfg['student_hidden']}, {cfg['student_layers']} layers, {cfg['student_steps']} steps "
        f"each, the same batches ({cfg['batch_size']} x {cfg['seq_len']} tokens) and initialization. "
        f"Distillation: T = {cfg['temperature']}, alpha = {cfg['alpha']}.",
        "",
        "| model | params | held-out perplexity | teacher NLL of its samples | own NLL of its samples | step (ms) "
        "| peak memory (MiB) | train (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in _models(report):
        m = report[key]
        mem = "n/a" if m["peak_rss_mib"] is None else f"{m['peak_rss_mib']:.0f}"
        lines.append(f"| `{key}`: {m['description']} | {m['params']:,} | {m['perplexity']:.2f} | "
                     f"{m['sample_teacher_nll']:.3f} | {m['sample_own_nll']:.3f} | "
                     f"{m['step_ms']:.0f} | {mem} | {m['train_s']:.1f} |")
    if "student_scratch" in report and "student_distilled" in report:
        s, d = report["student_scratch"]["perplexity"], report["student_distilled"]["perplexity"]
        lines += ["", f"Distilled (forward KL) vs cross-entropy only: perplexity {d:.2f} vs {s:.2f} "
                      f"({100 * (d - s) / s:+.1f} %)."]
    if "student_topk" in report:
        t = report["student_topk"]
        lines += ["", f"The offline student's top-{t['top_k']} cache took {t['cache_s']:.1f} s to compute "
                      f"(once) and holds {t['cache_mib']:.1f} MiB; its step time excludes the teacher."]
    lines += [""] + _sample_note(meta) + [
        "",
        f"Step time: {meta['step_time_method']}. Peak memory: {meta['memory_method']}.",
        f"{meta['device']}, {meta['threads']} torch threads, torch {meta['torch']}, fastkd {meta['fastkd']}; "
        f"total {meta['total_s']:.1f} s.",
        "",
        "![held-out perplexity and the teacher NLL of samples](perplexity.png)",
        "",
    ]
    return "\n".join(lines)


def _sample_note(meta: dict[str, Any]) -> list[str]:
    s = meta["sample_metric"]
    lines = [f"Samples: each model continues {s['prompts']} held-out prompts of {s['prompt_tokens']} tokens with "
             f"{s['new_tokens']} tokens, {s['sampling']}. NLL is per token, in nats: the teacher's NLL of a "
             f"model's samples is the on-policy metric; minus the model's own, it estimates the reverse KL."]
    for key, why in meta.get("skipped", {}).items():
        lines += ["", f"`{key}` was skipped: it {why}."]
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _models(report)
    labels = [k.replace("student_", "") for k in keys]
    colors = ["#555555"] + ["#d62728" if k == "student_scratch" else "#1f77b4" for k in keys[1:]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    panels = (("perplexity", "held-out perplexity", "%.1f"),
              ("sample_teacher_nll", "teacher NLL of the model's samples (nats/token)", "%.2f"))
    for ax, (field, ylabel, fmt) in zip(axes, panels, strict=True):
        bars = ax.bar(labels, [report[k][field] for k in keys], color=colors)
        ax.bar_label(bars, fmt=fmt)
        ax.set_ylabel(f"{ylabel}\n(lower is better)")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle("LM distillation on Python's standard library")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot(report, out / "perplexity.png")
