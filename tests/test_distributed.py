"""The Distiller under torchrun-style DDP: 2 CPU processes (gloo), started with the environment
variables torchrun sets, so that the Distiller joins the process group itself."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _spawn import free_port
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastkd
from fastkd import Distiller
from fastkd.trainer import load_checkpoint

IN, CLASSES, N_TRAIN, N_VAL = 10, 4, 96, 45  # 45: odd, so a padding sampler would count one twice


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    return TensorDataset(x, (x[:, :CLASSES] - x[:, CLASSES:2 * CLASSES]).argmax(1))


def _models(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    torch.manual_seed(seed)  # ranks start from different weights: DDP must broadcast rank 0's
    student = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES))
    return teacher, student


VOCAB, SEQ, N_SEQ = 9, 6, 24


def _tokens() -> TensorDataset:
    """Sequences whose supervised-token counts differ between the ranks' shards: the even ones (rank
    0's under a DistributedSampler without shuffling) keep 2 labels, the odd ones all but random tails."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=g)
    labels = (ids * 2 + 1) % VOCAB
    labels[::2, 2:] = -100
    labels[1::2][torch.arange(SEQ) >= torch.randint(1, SEQ + 1, (N_SEQ // 2, 1), generator=g)] = -100
    return TensorDataset(ids, labels)


def _token_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    student = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))
    return teacher, student


def _accumulating(grad_accum_steps: int) -> Distiller:
    teacher, student = _token_models()
    return Distiller(teacher, student, fastkd.DistillLoss(2.0, 0.5), torch.optim.SGD(student.parameters(), lr=1.0),
                     grad_accum_steps=grad_accum_steps, device="cpu")


def _distiller(seed: int) -> Distiller:
    teacher, student = _models(seed)
    return Distiller(teacher, student, fastkd.DistillLoss(2.0, 0.5),
                     torch.optim.Adam(student.parameters(), lr=1e-2), device="cpu")


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    train = DataLoader(_data(N_TRAIN, 0), batch_size=8, shuffle=True)
    val = DataLoader(_data(N_VAL, 1), batch_size=7)

    d = _distiller(seed=rank)
    history = d.fit(train, 2, val_loader=val, checkpoint_dir=os.path.join(tmp, f"straight{rank}"),
                    log_dir=os.path.join(tmp, f"logs{rank}"), progress=True)
    straight = {k: v.clone() for k, v in d.student.state_dict().items()}
    evaluated = d.evaluate(val)

    # Resume under DDP: stop after epoch 1, then a new Distiller picks up from the shared checkpoint.
    torch.manual_seed(1234)
    d1 = _distiller(seed=rank)
    d1.fit(train, 1, checkpoint_dir=os.path.join(tmp, "shared"), progress=False)
    torch.manual_seed(99 + rank)  # other RNG states, another default sampler seed
    d2 = _distiller(seed=50 + rank)
    d2.fit(train, 2, checkpoint_dir=os.path.join(tmp, "shared"), resume=True, progress=False)
    # Accumulation across ranks: 12 sequences each, windows of 2 micro-batches of 4, then a leftover of 1.
    acc = _accumulating(2)
    acc_history = acc.fit(DataLoader(_tokens(), batch_size=4), 1, progress=False)
    acc_eval = acc.evaluate(DataLoader(_tokens(), batch_size=5))
    torch.save({"student": straight, "history": history, "eval": evaluated, "step": d.step,
                "resumed": d2.student.state_dict(), "world": d.dist.world_size,
                "accumulated": acc.student.state_dict(), "accumulated_steps": acc.step,
                "accumulated_history": acc_history, "accumulated_eval": acc_eval},
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_ranks_train_the_same_weights_on_half_the_data_each(two_ranks):
    _, (r0, r1) = two_ranks
    assert r0["world"] == r1["world"] == 2
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
    # A DistributedSampler gave each rank 48 of the 96 examples: 6 steps of 8 per epoch, not 12.
    assert r0["step"] == r1["step"] == 2 * 6
    # Metrics are all-reduced: both ranks report the same history.
    drop = {"time_s"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in r0["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in r1["history"]
    ]


def test_distributed_evaluate_counts_every_example_once(two_ranks):
    _, (r0, _) = two_ranks
    teacher, student = _models(0)
    student.load_state_dict(r0["student"])
    single = Distiller(teacher, student, fastkd.DistillLoss(2.0, 0.5), device="cpu").evaluate(
        DataLoader(_data(N_VAL, 1), batch_size=N_VAL))
    assert r0["eval"]["accuracy"] == single["accuracy"]
    assert r0["eval"]["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_only_rank0_writes_files(two_ranks):
    tmp, _ = two_ranks
    assert load_checkpoint(tmp / "straight0" / "last.pt")["epoch"] == 2
    assert (tmp / "logs0" / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (tmp / "logs0" / "curves.png").is_file()
    assert not (tmp / "straight1").exists() and not (tmp / "logs1").exists()


def test_resume_under_ddp_matches_the_straight_run(two_ranks):
    _, (r0, r1) = two_ranks
    for k in r0["student"]:
        assert torch.equal(r0["resumed"][k], r0["student"][k]), k
        assert torch.equal(r1["resumed"][k], r0["student"][k]), k


def test_accumulation_across_ranks_is_the_per_token_mean_of_one_big_batch(two_ranks):
    _, (r0, r1) = two_ranks
    single = _accumulating(1)
    history = single.fit(DataLoader(_tokens(), batch_size=16), 1, progress=False)  # windows: 16 sequences, 8
    assert r0["accumulated_steps"] == single.step == 2
    for k, v in single.student.state_dict().items():
        torch.testing.assert_close(r0["accumulated"][k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["accumulated"][k], r1["accumulated"][k])
    # The logged loss and evaluate() are per-token means over every rank's rows.
    assert r0["accumulated_history"][0]["train_loss"] == pytest.approx(history[0]["train_loss"], rel=1e-5)
    evaluated = single.evaluate(DataLoader(_tokens(), batch_size=N_SEQ))
    for key in ("loss", "soft", "hard", "accuracy"):
        assert r0["accumulated_eval"][key] == pytest.approx(evaluated[key], rel=1e-5), key
