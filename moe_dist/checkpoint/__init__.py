"""Checkpoint tools: inspect, consolidate, reshard and export moe_dist training checkpoints, and
load a consolidated checkpoint into a model of any expert-parallel size.

Modules: `files` (CheckpointError, file reading/writing, staged outputs), `layout` (names and
places in a training checkpoint), `tags` (completion marker, run ids: is a tag complete and one
run's), `training` (TrainingCheckpoint), `zero` (the ZeRO-1/2 partition
layout and reader), `consolidated` (the format, consolidate, load/save, open_checkpoint),
`reshard`, `hf_export` (export_hf; `hf_remote_code/` holds the files it ships; `hf_tokenizer` the
byte tokenizer, pad ids and generation_config), `cli` (the command line and the inspect summary).

CLI: tools/convert_checkpoint.py; formats and mappings: docs/checkpoints.md.
"""

from moe_dist.checkpoint.cli import summarize
from moe_dist.checkpoint.consolidated import (ConsolidatedCheckpoint, consolidate, load_consolidated,
                                              open_checkpoint, save_consolidated)
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.hf_export import export_hf
from moe_dist.checkpoint.reshard import reshard
from moe_dist.checkpoint.training import TrainingCheckpoint

__all__ = ["CheckpointError", "ConsolidatedCheckpoint", "TrainingCheckpoint", "consolidate", "export_hf",
           "load_consolidated", "open_checkpoint", "reshard", "save_consolidated", "summarize"]
