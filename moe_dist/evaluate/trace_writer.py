"""Writing the routing trace (docs/routing_trace.md): each rank writes its own rows, no collective,
one Parquet file per (phase, step) under a temporary name, renamed when complete.

Bounded: a file holds at most `max_file_bytes` worth of rows (uncompressed size, which bounds
Parquet's; rows past it are left out, the file's metadata says how many) and a rank writes at
most `max_total_bytes` in all, after which it traces nothing more and says so once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe_dist.common.atomic import staged_file
from moe_dist.evaluate.trace_format import (FILE_OVERHEAD_BYTES, document_ordinals, file_name, fixed_list,
                                            pair_status, row_bytes, schema_metadata)
from moe_dist.moe.layer import RouteRecord


def sample_positions(num_tokens: int, tokens: int | None) -> torch.Tensor:
    """Which of a micro batch's T tokens are traced: all (None), else `tokens` evenly strided
    ones, the same at every step, layer and rank (so evaluations trace the same tokens)."""
    if tokens is None or tokens >= num_tokens:
        return torch.arange(num_tokens)
    return torch.arange(tokens) * num_tokens // tokens


class TraceWriter:
    def __init__(self, directory: str, meta: dict[str, Any], *, rank: int, top_k: int,
                 layers: Sequence[int] | None = None, tokens: int | None = None, eod: int | None = None,
                 max_file_bytes: int = 64 << 20, max_total_bytes: int = 1 << 30,
                 log: Callable[[str], None] = print) -> None:
        """`meta`: the model's identity and the run's settings, stored in every file. `layers`:
        the MoE layers traced (None: all); `tokens`: per micro batch and layer (None: all)."""
        self.directory = directory
        self.meta = {**meta, "tokens": "all" if tokens is None else tokens, "rank": rank}
        self.rank = rank
        self.layers = None if layers is None else set(layers)
        self.tokens = tokens
        self.eod = eod
        self.row_bytes = row_bytes(top_k)
        self.max_rows = max(0, (max_file_bytes - FILE_OVERHEAD_BYTES) // self.row_bytes)
        self.max_total_bytes = max_total_bytes
        self.written_bytes = 0
        self.stopped = False
        self.log = log
        self._parts: list[dict[str, np.ndarray]] = []
        self._rows = 0
        self._left_out = 0
        os.makedirs(directory, exist_ok=True)

    @property
    def active(self) -> bool:
        return not self.stopped

    def add(self, micro: int, tokens_BS: torch.Tensor, domain_ids_BS: torch.Tensor | None,
            routes: dict[int, RouteRecord]) -> None:
        """Buffer the sampled rows of one forward (reads its routes to the host: called outside
        the model, after the forward)."""
        if self.stopped:
            return
        B, S = tokens_BS.shape
        pick = sample_positions(B * S, self.tokens)
        tokens = tokens_BS.detach().cpu().reshape(-1)[pick]
        domains = (torch.full((B * S,), -1, dtype=torch.long) if domain_ids_BS is None
                   else domain_ids_BS.detach().cpu().reshape(-1))[pick]
        docs = document_ordinals(tokens_BS.detach().cpu(), self.eod).reshape(-1)[pick]
        for layer in sorted(routes):
            if self.layers is not None and layer not in self.layers:
                continue
            room = self.max_rows - self._rows
            n = min(len(pick), room)
            self._left_out += len(pick) - n
            if n <= 0:
                continue
            record = routes[layer]
            rows = pick[:n]
            self._parts.append({
                "micro": np.full(n, micro, np.int32), "layer": np.full(n, layer, np.int16),
                "row": (rows // S).numpy().astype(np.int32), "position": (rows % S).numpy().astype(np.int32),
                "document": docs[:n].numpy().astype(np.int32), "domain": domains[:n].numpy().astype(np.int32),
                "token_id": tokens[:n].numpy().astype(np.int32),
                "experts": record.idx_TK.detach().cpu()[rows].numpy().astype(np.int16),
                "weights": record.w_TK.detach().float().cpu()[rows].numpy(),
                "status": pair_status(record).cpu()[rows].numpy()})
            self._rows += n

    def flush(self, phase: str, step: int) -> str | None:
        """Write the buffered rows as this rank's file of (phase, step); None when nothing was
        buffered or the total bound is reached."""
        parts, left_out = self._parts, self._left_out
        self._parts, self._rows, self._left_out = [], 0, 0
        if self.stopped or not parts:
            return None
        n = sum(len(p["micro"]) for p in parts)
        if self.written_bytes + n * self.row_bytes + FILE_OVERHEAD_BYTES > self.max_total_bytes:
            self.stopped = True
            self.log(f"routing trace: rank {self.rank} reached trace.max_total_mb "
                     f"({self.max_total_bytes / 2**20:g} MiB) at step {step}; no more trace files")
            return None
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        arrays = {
            "phase": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([phase])),
            "step": pa.array(np.full(n, step, np.int32)), "micro": pa.array(cols["micro"]),
            "rank": pa.array(np.full(n, self.rank, np.int16)), "layer": pa.array(cols["layer"]),
            "row": pa.array(cols["row"]), "position": pa.array(cols["position"]),
            "document": pa.array(cols["document"]), "domain": pa.array(cols["domain"]),
            "token_id": pa.array(cols["token_id"]),
            "experts": fixed_list(cols["experts"], pa.int16()), "weights": fixed_list(cols["weights"], pa.float32()),
            "status": fixed_list(cols["status"], pa.int8()),
        }
        table = pa.table(arrays).replace_schema_metadata(
            schema_metadata({**self.meta, "phase": phase, "step": step, "rows_left_out": left_out}))
        path = os.path.join(self.directory, file_name(phase, step, self.rank))
        with staged_file(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        self.written_bytes += os.path.getsize(path)
        return path


def trace_meta(identity: dict[str, Any], *, source: str, world_size: int, ep_size: int,
               **settings: Any) -> dict[str, Any]:
    """What every trace file records besides its rows: the model's identity (`model_identity`),
    where it came from (`train` / `evaluate`), the world and EP size, and the settings."""
    return {**identity, "source": source, "world_size": world_size, "ep_size": ep_size, **settings}
