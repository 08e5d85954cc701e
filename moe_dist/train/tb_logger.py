"""TensorBoard output (rank 0 only): training scalars, per-MoE-layer routing statistics
(docs/routers/statistics.md), the expert-load histogram and an expert-by-domain heatmap at
evaluations.

Tags:
    train/loss, train/perplexity, train/aux_loss, train/lr, train/grad_norm, train/tokens_per_s
    train/step_time_min, train/step_time_max, train/step_time_slowest_rank, train/skipped_steps
    val/loss, val/perplexity
    moe/layer<i>/{dropped_fraction, load_cv, load_max_over_mean, entropy_token (H_s),
                  entropy_mean (H_u), entropy_load, loss_<name>, mi_domain, mi_domain_normalized,
                  pairs_over_budget, pairs_spilled, pairs_budget_dropped (with moe.rank_capacity_factor)}
    moe/layer<i>/expert_load          histogram: bucket e holds expert e's routed tokens
    moe/layer<i>/val_mi_domain_normalized, image moe/layer<i>/expert_by_domain   (evaluations)

A failing write (a full disk, a vanished folder) must not end a training run: the first failure
prints one warning and turns TensorBoard output off for the rest of the run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys

from typing import Any

SKIP = ("load_E", "expert_label_counts")


def _tolerant(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.writer is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of a logging side channel
            self.disable(f"{method.__name__}: {type(e).__name__}: {e}")
            return None
    return wrapper


class TensorBoardLogger:
    def __init__(self, log_dir: str | None, enabled: bool) -> None:
        self.writer = None
        self.log_dir = log_dir
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(log_dir=log_dir)
            except Exception as e:  # noqa: BLE001 - as for every later write
                self.disable(f"opening: {type(e).__name__}: {e}")

    def disable(self, reason: str) -> None:
        writer, self.writer = self.writer, None
        print(f"warning: TensorBoard writing to {self.log_dir!r} failed ({reason}); TensorBoard output is off "
              f"for the rest of this run, training goes on", file=sys.stderr, flush=True)
        if writer is not None:
            with contextlib.suppress(Exception):  # the writer is already broken
                writer.close()

    @_tolerant
    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    @_tolerant
    def moe(self, step: int, summary: dict[int, dict[str, Any]], prefix: str = "") -> None:
        """`MoEStatsAccumulator.unpack`'s rows: host values (floats, `load_E` a list), written
        without touching a tensor."""
        if self.writer is None:
            return
        for layer, row in summary.items():
            base = f"moe/layer{layer}/{prefix}"
            for name, value in row.items():
                if name not in SKIP and value is not None:
                    self.writer.add_scalar(base + name, float(value), step)
            self.expert_load_histogram(f"{base}expert_load", row["load_E"], step)

    def expert_load_histogram(self, tag: str, load_E: list[float], step: int) -> None:
        """The exact per-expert load as a histogram over expert ids (bucket e = expert e's
        routed tokens). `add_histogram` would need one value per routed token; the raw form
        costs O(E) whatever the batch."""
        load = [float(v) for v in load_E]
        self.writer.add_histogram_raw(
            tag, min=0.0, max=float(len(load) - 1), num=sum(load), sum=sum(i * v for i, v in enumerate(load)),
            sum_squares=sum(i * i * v for i, v in enumerate(load)),
            bucket_limits=[i + 0.5 for i in range(len(load))], bucket_counts=load, global_step=step)

    @_tolerant
    def expert_domain_heatmap(self, step: int, layer: int, joint_EL, domain_names: list[str]) -> None:
        """P(expert | domain) as an image: columns are domains, each sums to 1."""
        if self.writer is None:
            return
        import matplotlib

        matplotlib.use("Agg")  # no display on training nodes
        import matplotlib.pyplot as plt

        from moe_dist.evaluate.heatmap import draw_expert_by_domain

        E, L = len(joint_EL), len(joint_EL[0])
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * L, 1.0 + 0.3 * E))
        draw_expert_by_domain(fig, ax, joint_EL, domain_names, layer)
        fig.tight_layout()
        self.writer.add_figure(f"moe/layer{layer}/expert_by_domain", fig, step, close=True)

    @_tolerant
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    @_tolerant
    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # exp overflows past ~709; 50 is already meaningless
