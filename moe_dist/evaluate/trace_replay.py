"""Route replay from a routing trace (docs/routing_trace.md): the routes a forward must take, read
from the trace's files of this rank, as `ForcedRoute`s for `MoETransformer.forward(forced_routes=...)`.

A trace replays where it holds every token of a forward (`trace.tokens: all`) and a model of the
same shape, vocabulary and layers (checked when opened, before any training; the router type may
differ); forwards it has no rows for route as usual.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from moe_dist.evaluate.trace_format import SHAPE_FIELDS, TraceError, check_identity, experts_of, read_metadata
from moe_dist.routing.base import ForcedRoute

_NAME = re.compile(r"^(train|eval)-step(\d{8})-rank(\d{5})\.parquet$")


def trace_files(directory: str, where: str) -> dict[tuple[str, int, int], str]:
    """(phase, step, rank) -> path of every trace file in `directory`; a clear error if none."""
    if not os.path.isdir(directory):
        raise TraceError(f"{where} {directory!r} is not a directory of routing trace files")
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.parquet"))):
        m = _NAME.match(os.path.basename(path))
        if m:
            found[(m.group(1), int(m.group(2)), int(m.group(3)))] = path
    if not found:
        raise TraceError(f"{where} {directory!r} holds no routing trace file (<phase>-step<N>-rank<R>.parquet)")
    return found


class RouteReplay:
    def __init__(self, directory: str, identity: dict[str, Any], *, rank: int, world_size: int,
                 with_weights: bool = False, where: str = "trace.replay") -> None:
        """Checks the trace against the model (`identity`, `trace_format.model_identity`) and the
        world size, and that it traced every token, from the first file's metadata."""
        self.files = {(phase, step): path for (phase, step, r), path in trace_files(directory, where).items()
                      if r == rank}
        self.with_weights = with_weights
        self.where = f"{where} {directory!r}"
        first = next(iter(sorted(trace_files(directory, where).values())))
        meta = read_metadata(pq.read_schema(first), first)
        check_identity(meta, identity, first, "this run's model", SHAPE_FIELDS)
        # Another router type is a use of its own: its routes under this router's weights.
        self.recorded_router = meta.get("router")
        if meta.get("tokens") != "all":
            raise TraceError(f"{first}: traced {meta.get('tokens')} tokens per micro batch; replay needs a trace "
                             f"of every token (trace.tokens: all)")
        if meta.get("world_size") != world_size:
            raise TraceError(f"{first}: recorded with world size {meta.get('world_size')}, this run has "
                             f"{world_size} (replay gives each rank its own recorded tokens)")
        if not self.files:
            raise TraceError(f"{self.where} holds no file of rank {rank}")
        self.layers = identity["moe_layers"]
        self._cached: tuple[str, int] | None = None
        self._table = None

    def steps(self, phase: str) -> list[int]:
        return sorted(step for p, step in self.files if p == phase)

    def forced_routes(self, phase: str, step: int, micro: int, num_tokens: int,
                      device: torch.device) -> dict[int, ForcedRoute] | None:
        """The routes of forward `micro` of (phase, step) per traced MoE layer, or None if the trace
        has no file for it. Rows in the layer's token order; all `num_tokens` of each layer must be there."""
        path = self.files.get((phase, step))
        if path is None:
            return None
        if self._cached != (phase, step):
            self._table = pq.read_table(path)
            self._cached = (phase, step)
        table = self._table
        micros = table.column("micro").to_numpy()
        layers = table.column("layer").to_numpy()
        rows = table.column("row").to_numpy().astype(np.int64)
        positions = table.column("position").to_numpy().astype(np.int64)
        out = {}
        traced = set(layers.tolist())
        for layer in self.layers:
            if layer not in traced:  # trace.layers left it out: it routes as usual
                continue
            sel = np.flatnonzero((micros == micro) & (layers == layer))
            if len(sel) != num_tokens:
                raise TraceError(f"{path}: {len(sel)} rows for MoE layer {layer} of forward {micro}, the forward "
                                 f"routes {num_tokens} tokens (another batch shape, or a capped trace file)")
            seq_len = positions[sel].max() + 1
            order = sel[np.argsort(rows[sel] * seq_len + positions[sel], kind="stable")]
            part = table.take(order)
            idx = torch.from_numpy(experts_of(part).astype(np.int64)).to(device)
            w = torch.from_numpy(experts_of(part, "weights").copy()).to(device) if self.with_weights else None
            out[layer] = ForcedRoute(idx_TK=idx, w_TK=w)
        return out
