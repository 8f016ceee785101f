"""The offline teacher cache: top-k log-probs next to the tokens, in Parquet shards that survive a
crash and resume."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("pyarrow")

from fastkd.integrations import topk_cache  # noqa: E402


def _teacher(vocab: int = 50) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _data(n: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 50, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist(),
             "labels": i} for i in range(n)]


def _read(paths) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for p in paths for row in pq.read_table(p).to_pylist()]


def test_rows_hold_the_teachers_topk_logprobs(tmp_path):
    teacher, data = _teacher(), _data()
    paths = topk_cache.cache_teacher_topk(teacher, data, 5, tmp_path, batch_size=2, shard_size=3, progress=False)
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    rows = _read(paths)
    assert [r["labels"] for r in rows] == list(range(7))
    for row, example in zip(rows, data, strict=True):
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        values, indices = torch.log_softmax(logits.float(), -1).topk(5, -1)
        assert row["input_ids"] == example["input_ids"]
        assert row["teacher_topk_indices"] == indices.tolist()
        torch.testing.assert_close(torch.tensor(row["teacher_topk_logprobs"]), values, rtol=1e-5, atol=1e-5)


def test_datasets_loads_the_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    topk_cache.cache_teacher_topk(_teacher(), _data(), 4, tmp_path, shard_size=4, progress=False)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "shard-*.parquet"), split="train")
    assert len(ds) == 7 and len(ds[0]["teacher_topk_indices"][0]) == 4


def test_a_crash_mid_write_keeps_finished_shards_and_resumes(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    teacher, data = _teacher(), _data()
    real_write = pq.write_table
    calls = {"n": 0}

    def crash_on_second(table, where, **kw):
        calls["n"] += 1
        real_write(table, where, **kw)
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(pq, "write_table", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        topk_cache.cache_teacher_topk(teacher, data, 3, tmp_path, shard_size=3, progress=False)
    monkeypatch.setattr(pq, "write_table", real_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastkd_topk.json", "shard-00000.parquet"]

    seen = []
    forward = teacher.forward

    def counting_forward(*args, **kw):
        seen.append(kw["input_ids"].shape[0])
        return forward(*args, **kw)

    monkeypatch.setattr(teacher, "forward", counting_forward)
    paths = topk_cache.cache_teacher_topk(teacher, data, 3, tmp_path, shard_size=3, progress=False)
    assert sum(seen) == 4  # only the sequences of the two unfinished shards
    assert len(_read(paths)) == 7


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    teacher, data = _teacher(), _data()
    topk_cache.cache_teacher_topk(teacher, data, 3, tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        topk_cache.cache_teacher_topk(teacher, data, 4, tmp_path, progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        topk_cache.cache_teacher_topk(teacher, data, 0, tmp_path / "x", progress=False)


def test_the_cli_verb_writes_the_cache(tmp_path):
    import json

    from fastkd.cli import main

    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _data(5)))
    assert main(["cache-topk", "--teacher", str(tmp_path / "teacher"), "--data", str(data), "--k", "3",
                 "--out", str(tmp_path / "cache"), "--shard-size", "2", "--no-progress", "--device", "cpu"]) == 0
    assert len(_read(sorted((tmp_path / "cache").glob("shard-*.parquet")))) == 5


def test_the_cache_trains_a_student_through_the_trainer(tmp_path):
    """cache_teacher_topk's shards are what DistillationTrainer(teacher_model=None) trains from."""
    from fastkd.integrations.transformers import DistillationConfig, DistillationTrainer

    teacher, data = _teacher(), _data(4)
    rows = _read(topk_cache.cache_teacher_topk(teacher, data, 6, tmp_path / "cache", progress=False))

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        out = {"input_ids": torch.zeros(len(examples), longest, dtype=torch.long),
               "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long),
               "labels": torch.full((len(examples), longest), -100),
               "teacher_topk_indices": torch.zeros(len(examples), longest, 6, dtype=torch.long),
               "teacher_topk_logprobs": torch.full((len(examples), longest, 6), float("-inf"))}
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(e["input_ids"])
            out["teacher_topk_indices"][i, :n] = torch.tensor(e["teacher_topk_indices"])
            out["teacher_topk_logprobs"][i, :n] = torch.tensor(e["teacher_topk_logprobs"])
        return out

    torch.manual_seed(1)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                              disable_tqdm=True, max_steps=2, per_device_train_batch_size=2, temperature=1.0,
                              alpha=0.5, dataloader_num_workers=0)
    trainer = DistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=rows,
                                  data_collator=collate)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
