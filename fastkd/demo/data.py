"""scikit-learn's digits (1797 8x8 images bundled with scikit-learn: nothing is downloaded), a fixed
train / test split, and the few-labels setting of the demo."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Transfer-set rows without a label carry this target: the student sees only the teacher's soft
# targets for them, and accuracy ignores them.
UNLABELLED = -1


@dataclass(frozen=True)
class Digits:
    """The digits split into train and test tensors: inputs float32 in [0, 1], shape (n, 64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits(test_size: float = 0.3, split_seed: int = 0) -> Digits:
    """Load the bundled digits and split them, stratified, with a fixed seed (the test set is the same
    for every run of the demo, so runs differ only in their labelled subset and initialization)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    return Digits(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                  torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def labelled_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` training examples, balanced across classes (n // C each, the remainder going
    to the first classes), chosen by ``seed``."""
    classes = int(y.max()) + 1
    if not classes <= n <= len(y):
        raise ValueError(f"n_labelled must be between {classes} (one per class) and {len(y)}, got {n}")
    rng = np.random.RandomState(seed)
    y_np = y.numpy()
    picks = []
    for c in range(classes):
        k = n // classes + (1 if c < n % classes else 0)
        picks.append(rng.permutation(np.flatnonzero(y_np == c))[:k])
    return torch.from_numpy(np.sort(np.concatenate(picks))).long()


def transfer_targets(y: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Targets for the whole training split as a transfer set: the true label on the labelled
    examples, :data:`UNLABELLED` everywhere else."""
    out = torch.full_like(y, UNLABELLED)
    out[labelled] = y[labelled]
    return out
