"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download), the study's
stand-in for MNIST: a stratified train/test split per seed, standardised with training
statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_CLASSES = 10
NUM_PIXELS = 64
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class DigitsSplit:
    x_train_BI: Tensor
    y_train_B: Tensor
    x_test_BI: Tensor
    y_test_B: Tensor


def digits_split(seed: int, test_fraction: float = TEST_FRACTION) -> DigitsSplit:
    """The split depends on `seed`, so the spread over seeds covers the data draw as well as the
    initialisation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_tr, x_te = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_te, dtype=torch.float32)
    mean_I = x_tr.mean(0)
    std_I = x_tr.std(0).clamp_min(1.0)  # border pixels are ~always 0: do not blow them up
    return DigitsSplit((x_tr - mean_I) / std_I, torch.tensor(y_tr), (x_te - mean_I) / std_I, torch.tensor(y_te))


def minibatch_indices(num_samples: int, batch_size: int, steps: int, g: torch.Generator) -> list[Tensor]:
    """`steps` batches of indices, epoch by epoch, each epoch a fresh permutation; the last,
    smaller batch of an epoch is dropped so every step sees `batch_size` samples."""
    batch_size = min(batch_size, num_samples)
    per_epoch = num_samples // batch_size
    batches: list[Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(num_samples, generator=g)
        batches += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return batches[:steps]
