#!/usr/bin/env python
"""Benchmark of fastkd against TRL's own chunked distillation loss (CPU or CUDA), in two parts:

- ``loss``: ``fastkd.fused_linear_distill_loss`` against TRL's ``ChunkedDivergenceFunction``
  (``trl/kernels/chunked_divergence.py``, the loss of TRL's ``DistillationTrainer``) on the same hidden
  states and lm_head weights, forward KL (TRL beta 0) and JSD (beta 0.5), same temperature, no T^2, no
  hard term; both checked against each other (loss and gradients) at every N before they are timed;
- ``trainer``: one training step (student and teacher forwards, loss, backward, AdamW step) of TRL's
  ``trl.DistillationTrainer`` and of ``fastkd.integrations.trl.DistillationTrainer`` on a small random
  Llama pair, on the same fixed prompt + completion batch (no generation).

    python benchmarks/bench_trl.py                      # both parts on the CPU, writes the results
    python benchmarks/bench_trl.py --smoke              # tiny shapes, writes nothing (--out DIR keeps them)
    python benchmarks/bench_trl.py --mode loss --device cuda --dtype bf16 --n 8192 --h-student 4096 \
        --h-teacher 4096 --vocab 128256 --machine h200-trl

Interleaved rounds (order rotated per round), best of the rounds and medians; the helpers (inputs,
step, rounds, load wait, report's machine section) are those of bench_fused_linear.py; see
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fastkd
from fastkd.bench import machine
from fastkd.bench.memory import _reset_hwm, cpu_method, current_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_linear import (  # noqa: E402
    DTYPES,
    MIB,
    Contender,
    Inputs,
    machine_and_method,
    make_inputs,
    measured_step,
    step,
    timed_rounds,
    wait_for_load,
)

FASTKD, TRL = "fastkd", "TRL"
TRL_BETA = {"forward_kl": 0.0, "jsd": 0.5}  # TRL's beta of each divergence (fastkd's jsd uses the same beta)
TRAINER_FASTKD = "fastkd.integrations.trl.DistillationTrainer"
TRAINER_TRL = "trl.DistillationTrainer"
TARGET_SPEEDUP = 2.0
# Relative agreement asked of the two losses and gradients, by dtype of the inputs.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
SMOKE = ["--n", "64,96", "--h-student", "16", "--h-teacher", "24", "--vocab", "300", "--rounds", "2",
         "--model-vocab", "64", "--student-hidden", "16", "--teacher-hidden", "32", "--layers", "1",
         "--batch", "2", "--prompt-len", "4", "--completion-len", "6", "--steps", "2", "--load-limit", "1e9",
         "--threads", "1"]


# ---------------------------------------------------------------- part 1: the loss
def name(impl: str, divergence: str) -> str:
    return f"{impl} {divergence}"


def loss_contenders(divergences: list[str], temperature: float) -> list[Contender]:
    """fastkd and TRL per divergence: the per-token divergence averaged over the rows, nothing else."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    def fastkd_loss(divergence: str) -> Callable[[Inputs], torch.Tensor]:
        beta = TRL_BETA[divergence] if divergence == "jsd" else None
        return lambda x: fastkd.fused_linear_distill_loss(
            x.hs, x.ws, None, teacher_hidden=x.ht, teacher_weight=x.wt, temperature=temperature, alpha=1.0,
            scale_by_temperature_squared=False, divergence=divergence, beta=beta)

    def trl_loss(divergence: str) -> Callable[[Inputs], torch.Tensor]:
        # What TRL's _chunked_divergence_loss does with every row valid: the per-token divergence, mean.
        beta = TRL_BETA[divergence]
        return lambda x: ChunkedDivergenceFunction.apply(x.hs, x.ws, None, x.ht, x.wt, None, beta,
                                                         temperature)[0].mean()

    out = []
    for divergence in divergences:
        out += [Contender(name(FASTKD, divergence), fastkd_loss(divergence)),
                Contender(name(TRL, divergence), trl_loss(divergence))]
    return out


def first_steps(cs: list[Contender], x: Inputs, device: str) -> dict:
    """One step of each contender (their warm-up): its loss, its student gradients, and the memory the
    process still holds after it (beyond the gradients left in .grad: buffers kept between steps)."""
    got = {}
    for c in cs:
        x.hs.grad = x.ws.grad = None
        base = current_bytes(device)
        t0 = time.perf_counter()
        out = c.forward(x)
        c.backward(out, x)
        first_s = time.perf_counter() - t0
        grads = (x.hs.grad, x.ws.grad)
        held = current_bytes(device) - base - sum(g.numel() * g.element_size() for g in grads)
        got[c.name] = {"loss": float(out.detach()), "grads": grads, "held_mib": max(held, 0) / MIB,
                       "first_call_s": round(first_s, 3)}
        x.hs.grad = x.ws.grad = None
        del out
    return got


def relative_max(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and that over max |b|."""
    diff = float((a.double() - b.double()).abs().max())
    return diff, diff / max(float(b.double().abs().max()), 1e-30)


def agreement(got: dict, divergence: str, tolerance: float) -> dict:
    """TRL's loss and student gradients against fastkd's, from the same inputs."""
    f, t = got[name(FASTKD, divergence)], got[name(TRL, divergence)]
    rec = {"fastkd_loss": f["loss"], "trl_loss": t["loss"], "loss_abs_diff": abs(f["loss"] - t["loss"]),
           "loss_rel_diff": abs(f["loss"] - t["loss"]) / max(abs(t["loss"]), 1e-30)}
    for label, i in (("hidden", 0), ("weight", 1)):
        rec[f"grad_{label}_max_abs_diff"], rec[f"grad_{label}_rel_diff"] = relative_max(f["grads"][i], t["grads"][i])
    rec["agree"] = max(rec["loss_rel_diff"], rec["grad_hidden_rel_diff"], rec["grad_weight_rel_diff"]) <= tolerance
    return rec


def loss_part(a: argparse.Namespace, log) -> dict:
    """Per N: both checked against each other (their warm-up step), then ``a.rounds`` interleaved rounds."""
    divergences = a.divergences.split(",")
    cs = loss_contenders(divergences, a.temperature)
    out = {}
    for n in [int(s) for s in a.n.split(",")]:
        log(f"loss N={n}")
        x = make_inputs(n, a.h_student, a.h_teacher, a.vocab, 0.0, 0, floor=False, device=a.device,
                        dtype=DTYPES[a.dtype])
        got = first_steps(cs, x, a.device)
        check = {d: agreement(got, d, TOLERANCE[a.dtype]) for d in divergences}
        res = timed_rounds(cs, x, a.rounds, step, log)
        for c in cs:
            res[c.name].update(held_mib=got[c.name]["held_mib"], first_call_s=got[c.name]["first_call_s"])
        out[str(n)] = {"results": res, "check": check, "ratios": {d: loss_ratios(res, d) for d in divergences}}
        del x, got
        gc.collect()
    return out


def loss_ratios(res: dict, divergence: str) -> dict:
    f, t = res[name(FASTKD, divergence)], res[name(TRL, divergence)]
    return {"time_best": t["fwd_bwd_ms_min"] / f["fwd_bwd_ms_min"], "time_median": t["fwd_bwd_ms"] / f["fwd_bwd_ms"],
            "memory": t["peak_extra_mib"] / max(f["peak_extra_mib"], 1e-9)}


# ---------------------------------------------------------------- part 2: a TRL training step
def llama(hidden: int, layers: int, vocab: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, pad_token_id=0, eos_token_id=1, bos_token_id=None))


def tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids (the trainers ask for one; the timed steps never use it)."""
    import tokenizers
    import transformers

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                padding_side="left")


def fixed_batch(batch: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> dict:
    """A batch in the form TRL's generation step hands to the loss: left-padded prompts of different
    lengths, completions that end at different lengths (the dataset's, not generated)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, vocab, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(2, vocab, (batch, completion_len), generator=g)
    rows = torch.arange(batch)
    prompt_mask = (torch.arange(prompt_len) >= (rows % 3)[:, None] * prompt_len // 4).long()
    completion_mask = (torch.arange(completion_len) < completion_len - (rows % 4)[:, None] * completion_len // 8).long()
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "num_items_in_batch": completion_mask.sum()}


def off_policy(trainer_class: type) -> type:
    """``trainer_class`` whose completions are a fixed batch instead of sampled ones: TRL 1.16's
    DistillationTrainer always generates (no off-policy mixing), so generation is left out this way."""

    class OffPolicy(trainer_class):
        fixed: dict

        def _prepare_inputs(self, generation_batch):
            return self.fixed

    OffPolicy.__name__ = OffPolicy.__qualname__ = f"OffPolicy{trainer_class.__name__}"
    return OffPolicy


def build_trainer(trainer_class: type, config_class: type, a: argparse.Namespace, divergence: str, out_dir: str,
                  batch: dict):
    import datasets

    device = "cpu" if a.device == "cpu" else "cuda"
    args = config_class(
        output_dir=out_dir, beta=TRL_BETA[divergence], temperature=a.temperature, max_steps=10**6,
        per_device_train_batch_size=batch["prompt_ids"].shape[0], optim="adamw_torch", learning_rate=1e-5,
        lr_scheduler_type="constant", bf16=False, use_cpu=device == "cpu", report_to="none", save_strategy="no",
        logging_steps=10**6, seed=0, disable_dropout=True)
    trainer = off_policy(trainer_class)(
        model=llama(a.student_hidden, a.layers, a.model_vocab, 0).to(device),
        teacher_model=llama(a.teacher_hidden, a.layers, a.model_vocab, 1).to(device), args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["w2 w3"] * 2}), processing_class=tokenizer(a.model_vocab))
    trainer.fixed = {k: v.to(device) for k, v in batch.items()}
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trainer_contender(label: str, trainer) -> Contender:
    """forward: TRL's training_step (both forwards, the loss, backward); backward: the optimizer step."""

    def forward(_x):
        return trainer.training_step(trainer.model, trainer.fixed, None)

    def backward(_out, _x):
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    c = Contender(label, forward, backward)
    c.trainer = trainer
    return c


def trainer_step(c: Contender, _x) -> dict:
    return measured_step(c, None, lambda: c.trainer.model.zero_grad(set_to_none=True), c.trainer.args.device.type)


def trainer_part(a: argparse.Namespace, log) -> dict:
    import trl

    from fastkd.integrations import trl as fastkd_trl

    batch = fixed_batch(a.batch, a.prompt_len, a.completion_len, a.model_vocab, 0)
    out = {"completion_tokens": int(batch["num_items_in_batch"]), "tokens": a.batch * (a.prompt_len + a.completion_len)}
    with tempfile.TemporaryDirectory() as tmp:
        for divergence in a.divergences.split(","):
            log(f"trainer {divergence}")
            cs = [trainer_contender(name(label, divergence), build_trainer(tc, cc, a, divergence, tmp, batch))
                  for label, tc, cc in ((TRAINER_FASTKD, fastkd_trl.DistillationTrainer, fastkd_trl.DistillationConfig),
                                        (TRAINER_TRL, trl.DistillationTrainer, trl.DistillationConfig))]
            first = {c.name: trainer_step(c, None) for c in cs}  # warm-up: the optimizer's state is made here
            f, t = (first[c.name]["loss"] for c in cs)
            res = timed_rounds(cs, None, a.steps, trainer_step, log)
            fr, tr = res[cs[0].name], res[cs[1].name]
            out[divergence] = {
                "results": res, "first_step_loss": {c.name: first[c.name]["loss"] for c in cs},
                "first_step_loss_rel_diff": abs(f - t) / max(abs(t), 1e-30),
                "ratios": {"time_best": tr["fwd_bwd_ms_min"] / fr["fwd_bwd_ms_min"],
                           "time_median": tr["fwd_bwd_ms"] / fr["fwd_bwd_ms"],
                           "memory": tr["peak_extra_mib"] / max(fr["peak_extra_mib"], 1e-9)}}
            del cs
            gc.collect()
    return out


# ---------------------------------------------------------------- report
def loss_lines(a: dict, part: dict) -> list[str]:
    lines = ["## Loss: fastkd.fused_linear_distill_loss vs TRL's ChunkedDivergenceFunction", "",
             f"H_student = {a['h_student']}, H_teacher = {a['h_teacher']}, V = {a['vocab']}, {a['dtype']}, "
             f"T = {a['temperature']}, no T^2, no hard term, every row counted (mean over N); student hidden states "
             f"and weight require grad, teacher frozen. {a['rounds']} interleaved rounds after one checked warm-up "
             "step each.", "",
             "| N | divergence | fastkd fwd+bwd ms (best) | TRL fwd+bwd ms (best) | TRL / fastkd (best) | "
             "TRL / fastkd (medians) | fastkd peak extra MiB | TRL peak extra MiB | TRL / fastkd memory | "
             f">= {TARGET_SPEEDUP:g}x |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n in sorted(part, key=int):
        res = part[n]["results"]
        for d, r in part[n]["ratios"].items():
            f, t = res[name(FASTKD, d)], res[name(TRL, d)]
            lines.append(f"| {n} | {d} | {f['fwd_bwd_ms_min']:.0f} | {t['fwd_bwd_ms_min']:.0f} | "
                         f"{r['time_best']:.2f}x | {r['time_median']:.2f}x | {f['peak_extra_mib']:.0f} | "
                         f"{t['peak_extra_mib']:.0f} | {r['memory']:.2f}x | "
                         f"{'met' if r['time_best'] >= TARGET_SPEEDUP else 'not met'} |")
    lines += ["", "Phases (medians, ms) and memory held after the first step beyond the gradients:", "",
              "| N | implementation | fwd | bwd | fwd+bwd median | held MiB |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for n in sorted(part, key=int):
        for c, r in part[n]["results"].items():
            lines.append(f"| {n} | {c} | {r['fwd_ms']:.0f} | {r['bwd_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | "
                         f"{r['held_mib']:.0f} |")
    lines += ["", "### Agreement (the checked warm-up step, same inputs)", "",
              "| N | divergence | fastkd loss | TRL loss | loss rel. diff | grad hidden max abs diff (rel.) | "
              "grad weight max abs diff (rel.) | agree |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n in sorted(part, key=int):
        for d, c in part[n]["check"].items():
            lines.append(f"| {n} | {d} | {c['fastkd_loss']:.6f} | {c['trl_loss']:.6f} | {c['loss_rel_diff']:.2e} | "
                         f"{c['grad_hidden_max_abs_diff']:.2e} ({c['grad_hidden_rel_diff']:.2e}) | "
                         f"{c['grad_weight_max_abs_diff']:.2e} ({c['grad_weight_rel_diff']:.2e}) | "
                         f"{'yes' if c['agree'] else 'NO'} |")
    return lines


def trainer_lines(a: dict, part: dict) -> list[str]:
    lines = ["## A TRL training step: trl.DistillationTrainer vs fastkd.integrations.trl.DistillationTrainer", "",
             f"Random-init Llama student (hidden {a['student_hidden']}) and teacher (hidden {a['teacher_hidden']}), "
             f"{a['layers']} layers each, vocabulary {a['model_vocab']}, fp32; batch {a['batch']} x ({a['prompt_len']} "
             f"prompt + {a['completion_len']} completion tokens), {part['completion_tokens']} completion tokens in "
             f"the loss; AdamW. {a['steps']} interleaved steps after one warm-up step each.", "",
             "| divergence | trainer | step ms (best) | step ms (median) | training_step ms (median) | "
             "optimizer ms (median) | peak extra MiB | first-step loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d in a["divergences"].split(","):
        p = part[d]
        for c, r in p["results"].items():
            lines.append(f"| {d} | {c.rsplit(' ', 1)[0]} | {r['fwd_bwd_ms_min']:.0f} | {r['fwd_bwd_ms']:.0f} | "
                         f"{r['fwd_ms']:.0f} | {r['bwd_ms']:.0f} | {r['peak_extra_mib']:.0f} | "
                         f"{p['first_step_loss'][c]:.6f} |")
    lines += [""] + [f"- {d}: TRL / fastkd step time {part[d]['ratios']['time_best']:.2f}x (best), "
                     f"{part[d]['ratios']['time_median']:.2f}x (medians); peak memory "
                     f"{part[d]['ratios']['memory']:.2f}x; first-step losses differ by "
                     f"{part[d]['first_step_loss_rel_diff']:.1e} (relative)" for d in a["divergences"].split(",")]
    return lines


def report(rec: dict) -> str:
    a = rec["args"]
    lines = [f"# fastkd vs TRL {rec['trl_version']}: the distillation loss and a training step "
             f"({a['device'].upper()})", ""]
    if "loss" in rec:
        lines += loss_lines(a, rec["loss"]) + [""]
    if "trainer" in rec:
        lines += trainer_lines(a, rec["trainer"])
    return "\n".join(lines + machine_and_method(rec, f", TRL {rec['trl_version']}"))


def method(a: argparse.Namespace) -> list[str]:
    cuda = a.device == "cuda"
    memory = ("torch.cuda.max_memory_allocated() minus memory_allocated() just before the step (peak statistics "
              "reset there, after a synchronisation)" if cuda else
              "Linux process RSS: before each step gc.collect() and glibc malloc_trim(0), the RSS high-water mark "
              "reset (write 5 to /proc/self/clear_refs) and VmRSS read; after the step VmHWM minus that VmRSS; page "
              "granularity, only written pages count" if _reset_hwm() else cpu_method())
    return [
        f"One process, torch.set_num_threads({a.threads}). Per round every implementation runs one step, in an order "
        "rotated per round (fastkd and TRL, every divergence, side by side); the best (minimum) of the rounds and "
        "the medians are reported. The machine is shared: ratios measured in the same rounds are what transfer.",
        "Loss: fastkd.fused_linear_distill_loss(hs, Ws, None, teacher_hidden=ht, teacher_weight=Wt, temperature=T, "
        "alpha=1, scale_by_temperature_squared=False, divergence='forward_kl' or 'jsd' with beta=0.5) against "
        "trl.kernels.chunked_divergence.ChunkedDivergenceFunction.apply(hs, Ws, None, ht, Wt, None, beta, T)[0].mean() "
        "(beta 0: forward KL, 0.5: JSD with TRL's mixture, the convention fastkd's jsd shares), what TRL's "
        "_chunked_divergence_loss computes when every completion token counts. A step: .grad = None for hs and Ws, "
        "forward, loss.backward(), perf_counter around each (after a synchronisation on CUDA). TRL projects the "
        "logits on 4096 x 32768 tiles again in its backward (and twice in the forward for JSD); fastkd computes "
        "every gradient in its forward and its backward only scales them, so compare forward+backward.",
        "Inputs: hs (N x H_s), ht (N x H_t) ~ N(0, 1), weights ~ N(0, 4 / H): logits of standard deviation about 2. "
        "The first step of each implementation at each N is the warm-up and the check: loss and both student "
        "gradients of TRL against fastkd's (max |difference|, and that over max |fastkd's|).",
        "Peak extra memory: " + memory + ". Inputs exist before the step and are not counted; the gradients the step "
        "leaves in .grad are. 'held MiB': what the process still held after the first step beyond those gradients "
        "(memory kept between steps), not in the peak.",
        "Training step: each trainer gets its own copy of the same random Llama pair and the same configuration "
        "(beta, temperature, AdamW at lr 1e-5, fp32); fastkd's DistillationConfig keeps its defaults, which give "
        "TRL's loss. TRL 1.16's DistillationTrainer always samples its completions (it has no lmbda / off-policy "
        "setting), so _prepare_inputs of both returns one fixed batch in the form TRL's generation hands to the "
        "loss (prompt_ids, prompt_mask, completion_ids, completion_mask, num_items_in_batch): the dataset's "
        "completions, no generation. A step: the student's .grad = None, trainer.training_step (the student and "
        "teacher forwards through TRL's forward redirection, the loss, backward; 'training_step ms'), then "
        "optimizer.step() and zero_grad ('optimizer ms'). The first step of each trainer is the warm-up (AdamW "
        "allocates its state there); its losses, from identical weights, are compared.",
    ]


# ---------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("all", "loss", "trainer"), default="all")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; writes nothing unless --out is given")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="of the loss part's inputs")
    p.add_argument("--divergences", default="forward_kl,jsd", help=f"from {','.join(TRL_BETA)}")
    p.add_argument("--temperature", type=float, default=0.9, help="TRL's default")
    p.add_argument("--n", default="1024,4096,8192", help="rows (tokens) of the loss part")
    p.add_argument("--h-student", type=int, default=512)
    p.add_argument("--h-teacher", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of the loss part, after its checked warm-up step")
    p.add_argument("--model-vocab", type=int, default=32000)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps of each trainer, after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load-limit", type=float, default=2.0, help="wait while the 1-minute load is above this")
    p.add_argument("--max-wait-s", type=float, default=300.0)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; none for --smoke)")
    p.add_argument("--machine", default=None, help="file stem (default <machine>-trl)")
    smoke = "--smoke" in argv
    a = p.parse_args([*SMOKE, *argv] if smoke else argv)
    bad = set(a.divergences.split(",")) - set(TRL_BETA)
    if bad:
        p.error(f"--divergences: {sorted(bad)} not among {sorted(TRL_BETA)}")
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be at least 1")
    if a.out is None and not a.smoke:
        a.out = "benchmarks/results"
    return a


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = parse(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import trl

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    w0 = time.perf_counter()
    load_before = wait_for_load(a.load_limit, a.max_wait_s, log)
    load_wait_s = time.perf_counter() - w0
    env = machine.environment(a.device, ["benchmarks/bench_trl.py", *args])
    env["command"] = " ".join(["python", "benchmarks/bench_trl.py", *args])
    rec = {"args": vars(a), "environment": env, "trl_version": trl.__version__, "load_before": load_before,
           "load_wait_s": load_wait_s}
    if a.mode in ("all", "loss"):
        rec["loss"] = loss_part(a, log)
    if a.mode in ("all", "trainer"):
        rec["trainer"] = trainer_part(a, log)
    rec["load_after"] = env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    rec["method"] = method(a)
    rec["run_s"] = time.perf_counter() - t_start
    text = report(rec)
    print(text)
    if a.out is not None:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = a.machine or machine.machine_name(a.device) + "-trl"
        (out / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
        (out / f"{stem}.md").write_text(text + "\n")
        log(f"wrote {out / stem}.{{json,md}}")
    agree = all(c["agree"] for n in rec.get("loss", {}).values() for c in n["check"].values())
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
