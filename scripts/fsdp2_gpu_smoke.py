#!/usr/bin/env python
"""DistillationTrainer(fused_linear=True) under accelerate's own FSDP2 plugin on one GPU: the path the
CPU cannot take (accelerate ignores FSDP configs on the CPU). A tiny Llama student / teacher pair, 2
steps, against the same run without FSDP.

    python scripts/fsdp2_gpu_smoke.py --out DIR

1. trains without FSDP in this process (the reference: its loss and parameters, to DIR/fsdp2-reference.pt);
2. writes accelerate's FSDP2 config (DIR/fsdp2-accelerate.yaml: ``distributed_type: FSDP``,
   ``fsdp_config.fsdp_version: 2``, each LlamaDecoderLayer a group of its own);
3. runs ``accelerate launch --config_file DIR/fsdp2-accelerate.yaml --num_processes 1`` on this script
   (``--child``), which trains the same student with accelerate sharding it, checks that the trainer's
   model is an FSDP2 module, and asserts that the loss is finite and equals the reference's to rtol 1e-4
   (the parameters to 1e-4 too).

Exit status 0 when all of it holds. ``--write-config PATH`` writes the config file only.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOCAB, SEQ, ROWS, STEPS, LR = 128, 16, 4, 2, 0.1
RTOL = 1e-4

# accelerate's FSDP2 plugin, as `accelerate config` writes it (fsdp_version 2).
CONFIG = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: FSDP
downcast_bf16: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_activation_checkpointing: false
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
use_cpu: false
"""


def _llama(hidden: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config)


def _examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(ROWS * STEPS):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: i % 3] = -100  # supervised-token counts that differ between sequences
        out.append({"input_ids": ids, "labels": labels})
    return out


def _collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in batch]) for k in batch[0]}


def train(out: str) -> dict:
    """STEPS steps of DistillationTrainer(fused_linear=True); the logged loss, the student's parameters
    (whole, on the CPU) and whether the trainer's model is an FSDP2 module."""
    import fastkd
    from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer

    teacher = _llama(96, 1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)  # sharper than the init so that the distillation term matters
    args = DistillationConfig(
        output_dir=out, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=STEPS, logging_steps=STEPS,
        dataloader_num_workers=0, train_sampling_strategy="sequential", per_device_train_batch_size=ROWS,
        fused_linear=True, divergence="forward_kl", temperature=2.0, alpha=0.5, chunk_size=8)
    trainer = DistillationTrainer(model=_llama(64, 0), teacher_model=teacher, args=args,
                                  train_dataset=_examples(), data_collator=_collate)
    loss = trainer.train().training_loss
    model = trainer.model
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu().clone()
              for k, v in model.named_parameters()}
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return {"loss": loss, "params": params, "fsdp2": fastkd.sharding.is_fsdp2(model),
            "fsdp_version": getattr(plugin, "fsdp_version", None)}


def compare(got: dict, want: dict) -> list[str]:
    """What differs between an FSDP2 run and the reference (empty: they agree)."""
    problems = []
    if not got["fsdp2"] or got["fsdp_version"] != 2:
        problems.append(f"the trainer's model is not an FSDP2 module (fsdp_version {got['fsdp_version']})")
    if not math.isfinite(got["loss"]):
        problems.append(f"loss {got['loss']} is not finite")
    elif not math.isclose(got["loss"], want["loss"], rel_tol=RTOL):
        problems.append(f"loss {got['loss']!r} != reference {want['loss']!r} (rtol {RTOL})")
    if got["params"].keys() != want["params"].keys():
        problems.append("the parameter names differ from the reference's")
    for k in sorted(got["params"].keys() & want["params"].keys()):
        if not torch.allclose(got["params"][k], want["params"][k], rtol=RTOL, atol=RTOL):
            diff = (got["params"][k] - want["params"][k]).abs().max().item()
            problems.append(f"parameter {k} differs from the reference's by {diff:.3g}")
    return problems


def _launch(config: Path, reference: Path) -> int:
    """accelerate launch of this script's --child in a fresh process (accelerate's environment)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           str(Path(__file__).resolve()), "--child", str(reference)]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, timeout=300).returncode


def _child(reference: Path) -> int:
    with tempfile.TemporaryDirectory() as out:
        got = train(out)
    want = torch.load(reference, weights_only=False)
    problems = compare(got, want)
    print(f"fsdp2 (accelerate, fsdp_version {got['fsdp_version']}): loss {got['loss']!r}; "
          f"reference: {want['loss']!r}")
    for p in problems:
        print("FAILED:", p)
    print("fsdp2 smoke:", "FAILED" if problems else "ok")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check-out", help="folder for the config file and the reference")
    parser.add_argument("--write-config", metavar="PATH", help="write accelerate's FSDP2 config file only")
    parser.add_argument("--child", metavar="REFERENCE", help=argparse.SUPPRESS)  # the run under accelerate
    args = parser.parse_args(argv)
    if args.write_config:
        Path(args.write_config).write_text(CONFIG)
        return 0
    if args.child:
        return _child(Path(args.child))
    if not torch.cuda.is_available():
        print("fsdp2 smoke: no CUDA device (accelerate applies FSDP on GPUs only)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config, reference = out / "fsdp2-accelerate.yaml", out / "fsdp2-reference.pt"
    config.write_text(CONFIG)
    env_fsdp = {k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))}
    if env_fsdp:
        print(f"fsdp2 smoke: the reference run needs an environment without {sorted(env_fsdp)}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        want = train(tmp)
    if want["fsdp2"]:
        print("fsdp2 smoke: the reference run was sharded")
        return 1
    torch.save(want, reference)
    print(f"reference (no FSDP): loss {want['loss']!r}", flush=True)
    return _launch(config, reference)


if __name__ == "__main__":
    sys.exit(main())
