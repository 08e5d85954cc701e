"""Checkpoint tools: inspect, consolidate, reshard and export moe_dist training checkpoints, and
load a consolidated checkpoint into a model of any expert-parallel size.

Modules: `files` (CheckpointError, file reading/writing, staged outputs), `layout` (names and
places in a training checkpoint), `tags` (completion marker, run ids: is a tag complete and one
run's), `training` (TrainingCheckpoint), `zero` (the ZeRO-1/2 partition
layout and reader), `consolidated` (the format, consolidate, load/save, open_checkpoint),
`reshard`, `hf_export` (export_hf; `hf_remote_code/` holds the files it ships; `hf_tokenizer` the
byte tokenizer, pad ids and generation_config), `hf_import` (import_hf, read_hf_model) with
`hf_files` (a local HF directory's config and safetensors), `hf_arch` (the HF architectures and
their config.json) and `hf_tensors` (every tensor's HF counterpart, both ways), `upcycle` (a dense
model into an MoE one), `cli` (the command line and the inspect summary).

CLI: tools/convert_checkpoint.py; formats and mappings: docs/checkpoints.md.
"""

from moe_dist.checkpoint.cli import summarize
from moe_dist.checkpoint.consolidated import (ConsolidatedCheckpoint, consolidate, load_consolidated,
                                              open_checkpoint, save_consolidated)
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.hf_export import export_hf
from moe_dist.checkpoint.hf_import import import_hf, read_hf_model
from moe_dist.checkpoint.reshard import reshard
from moe_dist.checkpoint.training import TrainingCheckpoint

__all__ = ["CheckpointError", "ConsolidatedCheckpoint", "TrainingCheckpoint", "consolidate", "export_hf",
           "import_hf", "load_consolidated", "open_checkpoint", "read_hf_model", "reshard", "save_consolidated",
           "summarize"]
