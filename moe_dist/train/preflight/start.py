"""Preflight's check of `train.init_from`, where a fresh run starts: readable metadata, the
structure of this run's model (multi-token prediction included), finite tensors, frozen constants
this run's model can draw; without it, the token counts a frequency
`hash` table is built from. (Whether the checkpoint folder may be written
or resumed is the format's to say: moe_dist.checkpoint.training.check_checkpoint_dir.)
"""

from __future__ import annotations

import os

from moe_dist.checkpoint.consolidated import (META_FILE, ConsolidatedCheckpoint, check_same_frozen_constants,
                                              check_structure)
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig
from moe_dist.routing.hash import read_token_counts
from moe_dist.train.preflight.finite import check_init_from_finite


def check_init_from(path: str | None, model: ModelConfig, seed: int) -> None:
    """A consolidated checkpoint's metadata must be readable, its structure this run's model's
    (model.mtp_layers included: a missing MTP block is named here, not as missing tensors at load),
    its tensors finite and its frozen constants drawable by this run's model (`seed`: train.seed)
    before any process starts."""
    if path is None:
        return
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from {path!r} is not a directory; expected the output folder of "
                          f"'tools/convert_checkpoint.py consolidate'")
    try:
        ckpt = ConsolidatedCheckpoint.open(path)
        if model is not None:
            check_structure(ckpt.config, model, os.path.join(path, META_FILE))
        check_same_frozen_constants(ckpt.config, model, seed, os.path.join(path, META_FILE))
        check_init_from_finite(path)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from None


def check_hash_token_counts(model: ModelConfig) -> None:
    """A fresh run without `train.init_from` builds its frequency `hash` tables from their counts
    files (docs/routers/hash.md): each must be there and valid now, not at the first forward. (A
    resumed or initialized run loads its tables from the checkpoint.)"""
    moe = model.moe
    if moe is None:
        return
    for where, router in (("moe.router", moe.router), ("moe.hash_router", moe.hash_router)):
        if router is None or router.type != "hash" or router.table != "frequency":
            continue
        if not os.path.isfile(router.token_counts):
            raise ConfigError(f"{where}.token_counts {router.token_counts!r} does not exist; a fresh run builds its "
                              f"frequency hash table from it: write it with tools/preprocess_data.py --token-counts")
        read_token_counts(router.token_counts, model.vocab_size)
