"""fastkd.integrations.trl under DDP: 2 CPU processes (gloo, set up by accelerate from the launch
environment, as TRL runs on the CPU), each generating its own completions of its own prompts; one step
of fastkd's trainer with TRL's loss knobs gives TRL's trainer's loss, entropy metric and weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is needed", allow_module_level=True)

from _spawn import spawn_ranks  # noqa: E402

WORLD, PER_RANK = 2, 2
BETAS = (0.0, 1.0, 0.5)  # forward KL, reverse KL, JSD


def _worker(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import _trl_pair as pair
    import trl

    from fastkd.integrations.trl import DistillationTrainer

    class Seen(DistillationTrainer):
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            self.seen = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    results = {}
    for beta in BETAS:
        kw = dict(beta=beta, temperature=0.9, per_device_train_batch_size=PER_RANK, ddp_backend="gloo")
        results[beta] = {
            "trl": pair.train(trl.DistillationTrainer, pair.args(Path(out) / "trl", trl.DistillationConfig, **kw),
                              n_prompts=WORLD * PER_RANK),
            "fastkd": pair.train(Seen, pair.args(Path(out) / "fastkd", **kw),
                                 n_prompts=WORLD * PER_RANK),
        }
    results["world"] = torch.distributed.get_world_size()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_two_processes_match_trl(tmp_path):
    ranks = spawn_ranks(_worker, tmp_path, WORLD)
    import _trl_pair as pair

    initial = pair.model(16, 0).state_dict()
    # Each process trained on its own prompts and completions.
    assert not torch.equal(ranks[0][0.5]["fastkd"]["seen"], ranks[1][0.5]["fastkd"]["seen"])
    for rank, results in enumerate(ranks):
        assert results["world"] == WORLD
        assert results[0.5]["fastkd"]["wrapper"] == results[0.5]["trl"]["wrapper"] == "DistributedDataParallel"
        for beta in BETAS:
            want, got = results[beta]["trl"], results[beta]["fastkd"]
            assert got["loss"] > 0
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (rank, beta)
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5), (rank, beta)
            moved = 0
            for name, value in want["weights"].items():
                torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6, msg=f"{rank} {beta} {name}")
                # DDP: both processes hold the same weights after the step.
                torch.testing.assert_close(got["weights"][name], ranks[0][beta]["fastkd"]["weights"][name])
                moved += not torch.equal(value, initial[name])
            assert moved > 0
