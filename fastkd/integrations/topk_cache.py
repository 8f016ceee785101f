"""The offline teacher cache: a teacher's per-token top-k log-probabilities next to the tokens, in
Parquet shards that ``datasets`` loads, so a student trains from them without the teacher
(``DistillationTrainer(teacher_model=None)``, or ``fastkd.SparseTeacher(kind="logprobs")`` directly).

Shards are written atomically (a temporary file, fsync, rename) and skipped when already complete, so
a run that crashed resumes where it stopped. This is the offline top-k distillation of DistillKit,
axolotl's KD plugin and TRL's server-side distillation: a full teacher distribution per token is far
too large to store.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

INDICES_COLUMN = "teacher_topk_indices"
LOGPROBS_COLUMN = "teacher_topk_logprobs"
MANIFEST = "fastkd_topk.json"


def _shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / f"shard-{shard:05d}.parquet"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(x) for x in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


@torch.no_grad()
def _topk_of_batch(teacher: torch.nn.Module, batch: list[list[int]], k: int, pad_id: int,
                   device: torch.device) -> list[tuple[list[list[int]], list[list[float]]]]:
    ids, mask = _pad(batch, pad_id)
    logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    out = []
    for i, x in enumerate(batch):
        n = len(x)
        out.append((indices[i, :n].cpu().tolist(), values[i, :n].cpu().tolist()))
    return out


def _plain(example: dict[str, Any]) -> dict[str, Any]:
    """An example with tensors turned into lists (what Arrow stores)."""
    return {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in example.items()}


def _check_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    path = output_dir / MANIFEST
    if not path.exists():
        _write_atomically(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        return
    found = json.loads(path.read_text())
    changed = {key: (found.get(key), value) for key, value in manifest.items() if found.get(key) != value}
    if changed:
        raise ValueError(
            f"{output_dir} holds a top-k cache made with other settings ({changed}, as (found, asked)); "
            "use another output_dir or delete it to start over"
        )


def cache_teacher_topk(
    teacher: torch.nn.Module,
    dataset: Sequence[dict[str, Any]],
    k: int,
    output_dir: str | os.PathLike,
    *,
    input_column: str = "input_ids",
    batch_size: int = 8,
    shard_size: int = 1024,
    pad_token_id: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run ``dataset`` through ``teacher`` and write each token's top-``k`` log-probabilities.

    Args:
        teacher: a causal LM whose forward takes ``input_ids`` and ``attention_mask`` and returns
            ``.logits`` of shape ``(B, S, V)`` (any ``transformers`` ``*ForCausalLM``).
        dataset: a sequence of examples (a ``datasets.Dataset``, or a list of dicts) whose
            ``input_column`` holds token ids; every other column is copied through.
        k: entries kept per token, 1 <= k <= V.
        output_dir: where ``shard-00000.parquet``, ... and a manifest go.
        batch_size: sequences per teacher forward; shard_size: sequences per shard file.
        pad_token_id: the id that pads a batch (masked by the attention mask, not stored).

    Returns:
        The shard paths, in order. Each row holds the example's columns plus ``teacher_topk_indices``
        (``S x k`` int) and ``teacher_topk_logprobs`` (``S x k`` float, log-softmax of the teacher's
        logits at T = 1, for position t: the distribution of token t + 1). Load them with
        ``datasets.load_dataset("parquet", data_files=f"{output_dir}/shard-*.parquet")``.

    Raises:
        ValueError: k < 1, a batch or shard size < 1, or an ``output_dir`` holding a cache made with
            other settings. Completed shards are kept and skipped on the next call (resume).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    shards = (n + shard_size - 1) // shard_size
    _check_manifest(out, {"k": k, "examples": n, "shard_size": shard_size, "input_column": input_column,
                          "teacher": type(teacher).__name__})
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    paths = []
    bar = tqdm(total=n, desc="teacher top-k", unit="seq", disable=not progress)
    try:
        for shard in range(shards):
            path = _shard_path(out, shard)
            lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
            paths.append(path)
            if path.exists():  # written completely by an earlier run (files appear only when whole)
                bar.update(hi - lo)
                continue
            rows = [_plain(dataset[i]) for i in range(lo, hi)]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                tokens = [list(map(int, r[input_column])) for r in chunk]
                for r, (idx, lp) in zip(chunk, _topk_of_batch(teacher, tokens, k, pad_token_id, device), strict=True):
                    r[INDICES_COLUMN] = idx
                    r[LOGPROBS_COLUMN] = lp
                bar.update(len(chunk))
            table = pa.Table.from_pylist(rows)
            _write_atomically(path, lambda p, table=table: pq.write_table(table, p))
    finally:
        bar.close()
        teacher.train(was_training)
    return paths
