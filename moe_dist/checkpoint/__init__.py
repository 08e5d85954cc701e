"""Checkpoint tools: inspect, consolidate, reshard and export moe_dist training checkpoints, and
load a consolidated checkpoint into a model of any expert-parallel size.

Sub-packages: `training/` (the training-checkpoint format: the only writer and reader of what the
trainer saves, with reshard) and `hf/` (Hugging Face export and import). Modules: `files`
(CheckpointError, file reading/writing, staged outputs), `consolidated` (the world-size-independent
format, consolidate, load/save, open_checkpoint), `upcycle` (a dense model into an MoE one),
`inspect` (what a checkpoint holds), `cli` (the command line). Imports flow
files -> training -> consolidated -> hf, upcycle -> inspect -> cli (tests/unit/test_import_graph.py).

CLI: tools/convert_checkpoint.py; formats and mappings: docs/checkpoints.md.
"""

from moe_dist.checkpoint.consolidated import (ConsolidatedCheckpoint, consolidate, load_consolidated, open_checkpoint,
                                              save_consolidated)
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.hf import export_hf, import_hf, read_hf_model
from moe_dist.checkpoint.inspect import summarize
from moe_dist.checkpoint.training import TrainingCheckpoint, reshard

__all__ = ["CheckpointError", "ConsolidatedCheckpoint", "TrainingCheckpoint", "consolidate", "export_hf",
           "import_hf", "load_consolidated", "open_checkpoint", "read_hf_model", "reshard", "save_consolidated",
           "summarize"]
