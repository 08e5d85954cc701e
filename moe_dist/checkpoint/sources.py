"""Open what a user points a tool at: a training checkpoint (directory with `latest`, or a tag
directory) or a consolidated directory; both yield the run config and the whole model's
ep_size=1 state dict, which is all `inspect` and `export-hf` need."""

from __future__ import annotations

from moe_dist.checkpoint.consolidate import model_state
from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.training import TrainingCheckpoint


def open_checkpoint(path: str, tag: str | None = None) -> TrainingCheckpoint | ConsolidatedCheckpoint:
    if tag is None and ConsolidatedCheckpoint.is_consolidated(path):
        return ConsolidatedCheckpoint.open(path)
    return TrainingCheckpoint.open(path, tag)


def full_state(ckpt: TrainingCheckpoint | ConsolidatedCheckpoint, master_weights: bool = False,
               progress: bool = True):
    if isinstance(ckpt, ConsolidatedCheckpoint):
        if master_weights:
            raise CheckpointError(f"{ckpt.path!r} is already consolidated ({ckpt.meta.get('weights')} weights); "
                                  f"--master-weights needs a training checkpoint with ZeRO files")
        return ckpt.state_dict()
    return model_state(ckpt, master_weights, progress)
