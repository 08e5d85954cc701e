"""Weights a run starts from must be finite: a NaN in `train.init_from` otherwise trains on as
`loss nan` and commits more NaN checkpoints. `init_from` is checked in preflight, one tensor at a
time from the consolidated file (safetensors are read lazily), before any process group exists.
A resumed checkpoint is checked by its loader (moe_dist/checkpoint/training/finite.py).
"""

from __future__ import annotations

import torch

from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint, _WeightsReader
from moe_dist.checkpoint.files import is_non_finite, name_some
from moe_dist.common.config import ConfigError


def check_init_from_finite(path: str) -> None:
    """Every floating tensor of the consolidated checkpoint `path` is finite, else ConfigError
    naming the tensors and the file."""
    ckpt = ConsolidatedCheckpoint.open(path)
    bad = []
    with _WeightsReader(ckpt.weights_path) as reader:
        for name in reader.names():
            t = reader.tensor(name)
            if is_non_finite(t):
                bad.append(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values non-finite)")
    if bad:
        raise ConfigError(f"train.init_from: {ckpt.weights_path!r} holds non-finite tensors: {name_some(bad)}; "
                          f"start from a finite checkpoint (an earlier tag, consolidated again)")
