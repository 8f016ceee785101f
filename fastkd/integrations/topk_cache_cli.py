"""``fastkd cache-topk``: the offline teacher cache from the command line (see topk_cache.py)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache-topk", help="write a teacher's per-token top-k log-probs next to the tokens (Parquet shards)",
        description="Streams tokenized examples through a causal-LM teacher (a local transformers model "
                    "directory) and writes each token's top-k log-probabilities in Parquet shards that "
                    "`datasets` loads; resumable: finished shards are kept and skipped.",
    )
    p.add_argument("--teacher", required=True, help="local model directory (AutoModelForCausalLM.from_pretrained)")
    p.add_argument("--data", required=True,
                   help="tokenized examples: a .jsonl file (one JSON object per line) or a .parquet file")
    p.add_argument("--k", type=int, required=True, help="entries per token")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input-column", default="input_ids")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true")


def _read_examples(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from fastkd.integrations.topk_cache import cache_teacher_topk

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).to(device)
    paths = cache_teacher_topk(
        teacher, _read_examples(Path(args.data)), args.k, args.out, input_column=args.input_column,
        batch_size=args.batch_size, shard_size=args.shard_size, device=device, progress=not args.no_progress,
    )
    print(f"wrote {len(paths)} shard(s) to {args.out}")
    return 0
