"""Hugging Face checkpoints, both ways, with transformers' own classes as the other side.

`exporter` (export-hf: a moe_dist checkpoint -> a directory transformers loads; `remote_code/`
holds the self-contained modeling files it ships for the custom architecture, `tokenizer` the
tokenizer files, pad ids and generation_config) and `importer` (import-hf: a local HF directory ->
a consolidated checkpoint), over `arch` (the HF architectures, their config.json and what each
computes), `tensors` (every tensor's HF counterpart, both ways) and `files` (a local HF
directory's config and safetensors). Formats and tables: docs/checkpoints.md.
"""

from moe_dist.checkpoint.hf.exporter import export_hf
from moe_dist.checkpoint.hf.importer import import_hf, read_hf_model

__all__ = ["export_hf", "import_hf", "read_hf_model"]
