"""Launching a multi-process (gloo) test: a free TCP port for the rendezvous, and every rank's saved
results once all ranks are done."""
from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[..., None], out: Path, world: int) -> list[dict]:
    """Runs ``worker(rank, str(out), port)`` in ``world`` processes and loads what each saved as
    ``out / f"rank{rank}.pt"``."""
    mp.spawn(worker, args=(str(out), free_port()), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
