"""Real text that ships with Python: the standard library's own source files (code, comments and
docstrings). Files are split into train and held-out by a hash of their path, so a held-out file is never
seen in training, and the split is the same on every run and machine with the same Python."""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

# Directories whose files are not the standard library's own modules (third-party packages) or are
# huge repetitive test data that would dominate a small corpus.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Train and held-out documents (one document per source file) and where they came from."""

    train: list[str]
    heldout: list[str]
    root: str
    train_files: int
    heldout_files: int

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)

    @property
    def heldout_chars(self) -> int:
        return sum(len(d) for d in self.heldout)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[str]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def _hash(rel: str) -> int:
    return zlib.crc32(rel.encode())  # stable across runs, unlike hash()


def load_corpus(train_chars: int, heldout_chars: int, heldout_every: int = 10,
                root: str | Path | None = None) -> Corpus:
    """Read stdlib source files until ``train_chars`` / ``heldout_chars`` characters are collected.

    A file is held out when the hash of its relative path is divisible by ``heldout_every``. Within each
    split, files are taken in hash order (a fixed pseudo-random order, so a small corpus still mixes
    many packages instead of being all ``asyncio``)."""
    base = Path(root) if root is not None else stdlib_root()
    files = sorted(_source_files(base), key=lambda rel: (_hash(rel) // heldout_every, rel))
    if not files:
        raise FileNotFoundError(f"no Python source files under {base}")
    train: list[str] = []
    heldout: list[str] = []
    sizes = {"train": 0, "heldout": 0}
    limits = {"train": train_chars, "heldout": heldout_chars}
    for rel in files:
        split = "heldout" if _hash(rel) % heldout_every == 0 else "train"
        if sizes[split] >= limits[split]:
            if all(sizes[k] >= limits[k] for k in sizes):
                break
            continue
        text = (base / rel).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        (heldout if split == "heldout" else train).append(text)
        sizes[split] += len(text)
    if not train or not heldout:
        raise ValueError(f"not enough source files under {base} for both splits")
    return Corpus(train, heldout, str(base), len(train), len(heldout))


def batch_starts(num_tokens: int, seq_len: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Start offsets ``(steps, batch_size)`` of random training windows: drawn once, so every student
    sees exactly the same batches in the same order."""
    if num_tokens <= seq_len:
        raise ValueError(f"the training stream has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq_len, (steps, batch_size), generator=gen)


def gather_windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(len(starts), seq_len)`` token windows of ``stream`` beginning at ``starts``."""
    return stream[starts.reshape(-1, 1) + torch.arange(seq_len)].reshape(*starts.shape, seq_len)


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Consecutive non-overlapping windows ``(n, seq_len)`` from the start of the held-out stream."""
    n = min(len(stream) // seq_len, max(max_tokens // seq_len, 1))
    if n < 1:
        raise ValueError(f"the held-out stream has {len(stream)} tokens, fewer than seq_len = {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)
