"""The trainer's routing trace and route replay (docs/routing_trace.md): which forwards are traced,
what routes a forward is forced to take, and where the trace's rows go. The model only returns
routes when asked (`MoESideInputs.trace`); every host read of the trace happens here, after the
forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from moe_dist.evaluate.trace_format import model_identity
from moe_dist.evaluate.trace_replay import RouteReplay
from moe_dist.evaluate.trace_writer import TraceWriter, trace_meta
from moe_dist.routing.base import ForcedRoute
from moe_dist.train.config import RunConfig


def open_replay(cfg: RunConfig, rank: int, world_size: int) -> RouteReplay | None:
    """trace.replay's trace, checked against the model and the world size (a TraceError, exit 2)."""
    if cfg.trace.replay is None:
        return None
    return RouteReplay(cfg.trace.replay, model_identity(cfg.model), rank=rank, world_size=world_size,
                       with_weights=cfg.trace.replay_weights)


class RunTracing:
    """trace.dir's writer and trace.replay's routes for one rank of a training run."""

    def __init__(self, cfg: RunConfig, replay: RouteReplay | None, *, rank: int, world: int, ep_size: int,
                 eod: int | None, log: Callable[[str], None]) -> None:
        self.cfg = cfg.trace
        self.replay = replay
        if replay is not None:
            log(f"trace.replay: routes of training steps {replay.steps('train') or '-'} and evaluations at steps "
                f"{replay.steps('eval') or '-'} come from {cfg.trace.replay} (recorded with router "
                f"{replay.recorded_router!r}); other forwards route as usual")
        self.writer = None
        if cfg.trace.dir:
            trace, train = cfg.trace, cfg.train
            meta = trace_meta(model_identity(cfg.model), source="train", world_size=world, ep_size=ep_size,
                              micro_batch=train.micro_batch, seq_len=train.seq_len, interval=trace.interval,
                              seed=train.seed)
            self.writer = TraceWriter(trace.dir, meta, rank=rank, top_k=cfg.model.moe.top_k, layers=trace.layers,
                                      tokens=trace.tokens_per_layer, eod=eod,
                                      max_file_bytes=int(trace.max_file_mb * 2**20),
                                      max_total_bytes=int(trace.max_total_mb * 2**20), log=log)

    def traced(self, phase: str, step: int) -> bool:
        """Whether the forwards of (phase, step) are traced (trace.dir, trace.interval, trace.eval)."""
        if self.writer is None or not self.writer.active:
            return False
        return self.cfg.eval if phase == "eval" else step % self.cfg.interval == 0

    def forced(self, phase: str, step: int, micro: int, num_tokens: int,
               device: torch.device) -> Mapping[int, ForcedRoute] | None:
        """The routes forward `micro` of (phase, step) is forced to take (None: its routers choose)."""
        if self.replay is None:
            return None
        return self.replay.forced_routes(phase, step, micro, num_tokens, device)

    def add(self, micro: int, tokens_BS: torch.Tensor, domain_ids_BS: torch.Tensor, routes) -> None:
        self.writer.add(micro, tokens_BS, domain_ids_BS, routes)

    def flush(self, phase: str, step: int) -> None:
        """Write the rows of (phase, step), if it was traced."""
        if self.traced(phase, step):
            self.writer.flush(phase, step)
