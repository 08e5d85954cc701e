"""Preflight's checks of where training starts: the checkpoint folder (a fresh run never overwrites
a checkpoint; `--resume` needs one) and `train.init_from` (readable metadata, finite tensors, frozen
constants this run's model can draw).
"""

from __future__ import annotations

import os

from moe_dist.checkpoint.consolidated import META_FILE, ConsolidatedCheckpoint, check_same_frozen_constants
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.training import read_latest
from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig
from moe_dist.train.preflight.finite import check_init_from_finite


def check_checkpoint_dir(checkpoint_dir: str | None, resume: bool) -> None:
    if resume:
        if not checkpoint_dir:
            raise ConfigError("--resume needs train.checkpoint_dir")
        if read_latest(checkpoint_dir) is None:
            raise ConfigError(f"--resume: no complete checkpoint in train.checkpoint_dir "
                              f"{checkpoint_dir!r} (no 'latest' file)")
    elif checkpoint_dir and read_latest(checkpoint_dir) is not None:
        raise ConfigError(
            f"train.checkpoint_dir {checkpoint_dir!r} already holds checkpoint "
            f"{read_latest(checkpoint_dir)!r}; pass --resume to continue it or choose an "
            f"empty folder (a fresh run would overwrite it)")


def check_init_from(path: str | None, model: ModelConfig, seed: int) -> None:
    """A consolidated checkpoint's metadata must be readable, its tensors finite and its frozen
    constants drawable by this run's model (`seed`: train.seed) before any process starts."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from {path!r} is not a directory; expected the output folder of "
                          f"'tools/convert_checkpoint.py consolidate'")
    try:
        ckpt = ConsolidatedCheckpoint.open(path)
        check_same_frozen_constants(ckpt.config, model, seed, os.path.join(path, META_FILE))
        check_init_from_finite(path)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None
