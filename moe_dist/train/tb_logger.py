"""TensorBoard output (rank 0 only), one of the trainer's metrics sinks (sink.py; all of them get
the same tags through metrics_log.py): training scalars, per-MoE-layer routing statistics
(docs/routers/statistics.md), the expert-load histogram and an expert-by-domain heatmap at
evaluations.

Tags:
    train/loss, train/perplexity, train/aux_loss, train/lr, train/grad_norm, train/tokens_per_s
    train/step_time_min, train/step_time_max, train/step_time_slowest_rank, train/skipped_steps
    train/mfu, train/model_tflops_per_device, train/peak_memory_gib
    val/loss, val/perplexity, val/loss_sem, val/domain/<name>/{loss, perplexity}
    moe/layer<i>/{dropped_fraction, load_cv, load_max_over_mean, entropy_token (H_s),
                  entropy_mean (H_u), entropy_load, loss_<name>, mi_domain, mi_domain_normalized,
                  pairs_over_budget, pairs_spilled, pairs_budget_dropped (with moe.rank_capacity_factor)}
    moe/layer<i>/expert_load          histogram: bucket e holds expert e's routed tokens
    moe/layer<i>/val_mi_domain_normalized, image moe/layer<i>/expert_by_domain   (evaluations)

A failing write (a full disk, a vanished folder) must not end a training run: the first failure
prints one warning and turns TensorBoard output off for the rest of the run.
"""

from __future__ import annotations

import math

from moe_dist.train.sink import Sink


class TensorBoardLogger(Sink):
    name = "TensorBoard"

    def __init__(self, log_dir: str | None, enabled: bool) -> None:
        super().__init__(log_dir)
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.open_tolerantly(lambda: SummaryWriter(log_dir=log_dir))

    @property
    def log_dir(self) -> str | None:
        return self.where

    @log_dir.setter
    def log_dir(self, value: str | None) -> None:
        self.where = value

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def write_histogram(self, tag: str, load: list[float], step: int) -> None:
        """As a histogram over expert ids. `add_histogram` would need one value per routed token;
        the raw form costs O(E) whatever the batch."""
        self.writer.add_histogram_raw(
            tag, min=0.0, max=float(len(load) - 1), num=sum(load), sum=sum(i * v for i, v in enumerate(load)),
            sum_squares=sum(i * i * v for i, v in enumerate(load)),
            bucket_limits=[i + 0.5 for i in range(len(load))], bucket_counts=load, global_step=step)

    def write_figure(self, tag: str, fig, step: int) -> None:
        self.writer.add_figure(tag, fig, step, close=False)  # the logger closes it after every sink

    def write_flush(self) -> None:
        self.writer.flush()

    def write_close(self, writer) -> None:
        writer.close()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # exp overflows past ~709; 50 is already meaningless
