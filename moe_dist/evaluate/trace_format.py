"""The routing trace's file format (docs/routing_trace.md): one Parquet file per (phase, step, rank),
one row per traced (token, MoE layer), and the model's identity in the file's metadata.

Columns: `phase` (train / eval), `step`, `micro` (micro batch of the step, or forward of an
evaluation), `rank`, `layer`, `row` (sequence in the micro batch), `position` (in the sequence),
`document` (ordinal of the token's document in its sequence, counted by end-of-document tokens;
-1 where the tokenizer has none), `domain` (-1: none), `token_id`, and per token K-long lists:
`experts` (the router's top-k ids), `weights` (its combine weights, before capacity) and `status`
(`STATUS`: kept, dropped, spilled). Rows of one layer and micro batch are in the layer's token
order, so a trace of every token is the layer's routes as they were.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig
from moe_dist.moe.layer import RouteRecord

FORMAT = "moe_dist.routing_trace/1"
META_KEY = b"moe_dist.routing_trace"
STATUS = {"kept": 0, "dropped": 1, "spilled": 2}
PHASES = ("train", "eval")
# Identity fields a trace must share with a model or with another trace to be read against it.
IDENTITY_FIELDS = ("vocab_size", "d_model", "n_layers", "moe_layers", "num_experts", "top_k", "router")
# A model's shape, vocabulary and layers: what replay and a comparison need (the router may differ:
# one router's routes replay under another's weights).
SHAPE_FIELDS = IDENTITY_FIELDS[:-1]
# Fixed columns' bytes, plus per choice an expert id, a weight and a status: a row's uncompressed
# size, which bounds what Parquet writes for it.
FIXED_ROW_BYTES = 1 + 4 + 4 + 2 + 2 + 4 + 4 + 4 + 4 + 4
CHOICE_BYTES = 2 + 4 + 1
# The Parquet footer and schema (with the metadata) on top of the rows.
FILE_OVERHEAD_BYTES = 64 * 1024


class TraceError(ConfigError):
    """A trace that cannot be read for this purpose (another model, missing rows)."""


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What a trace records about the model it came from, compared field by field on reading."""
    moe = cfg.moe
    return {"vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "moe_layers": cfg.moe_layer_indices, "num_experts": moe.num_experts if moe else 0,
            "top_k": moe.top_k if moe else 0, "router": moe.router.type if moe else None}


def check_identity(found: dict[str, Any], expected: dict[str, Any], found_where: str, expected_where: str,
                   fields: tuple[str, ...] = IDENTITY_FIELDS) -> None:
    """Refuse a trace whose model differs from the expected one, naming every differing field."""
    diffs = [f"{name} {found.get(name)!r} vs {expected.get(name)!r}" for name in fields
             if found.get(name) != expected.get(name)]
    if diffs:
        raise TraceError(f"trace {found_where} comes from another model than {expected_where}: "
                         f"{'; '.join(diffs)} (trace vs expected)")


def row_bytes(top_k: int) -> int:
    return FIXED_ROW_BYTES + CHOICE_BYTES * top_k


def file_name(phase: str, step: int, rank: int) -> str:
    return f"{phase}-step{step:08d}-rank{rank:05d}.parquet"


def pair_status(record: RouteRecord) -> torch.Tensor:
    """int8 [T, K] status codes: spilled where the record says so, else kept or dropped."""
    status = torch.where(record.keep_TK, STATUS["kept"], STATUS["dropped"]).to(torch.int8)
    if record.spilled_TK is not None:
        status = torch.where(record.spilled_TK, torch.full_like(status, STATUS["spilled"]), status)
    return status


def document_ordinals(tokens_BS: torch.Tensor, eod: int | None) -> torch.Tensor:
    """int32 [B, S]: the ordinal of each token's document in its sequence (an end-of-document
    token closes its document); -1 everywhere without an end-of-document id."""
    if eod is None:
        return torch.full(tokens_BS.shape, -1, dtype=torch.int32)
    ends = (tokens_BS == eod).to(torch.int32)
    return (torch.cumsum(ends, dim=1) - ends).to(torch.int32)


def fixed_list(values: np.ndarray, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    rows, width = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa_type), width)


def schema_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {META_KEY: json.dumps({"format": FORMAT, "status": STATUS, **meta}, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema, where: str) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{where} is not a moe_dist routing trace (no {META_KEY.decode()!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise TraceError(f"{where}: trace format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta


def experts_of(table: pa.Table, column: str = "experts") -> np.ndarray:
    """[rows, K] numpy array of a fixed-size-list column."""
    col = table.column(column).combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
