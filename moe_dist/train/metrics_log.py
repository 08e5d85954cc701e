"""The trainer's one logging interface: every metric goes to each configured sink (TensorBoard,
W&B, MLflow: tb_logger.py, trackers.py) with the same tag, on rank 0 only; the other ranks get a
logger with no sinks. The values are host numbers the trainer already read: logging adds no host
read. Each sink fails on its own (sink.py): one warning, that sink off, the others and training
go on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Any

from moe_dist.common.config import ConfigError
from moe_dist.train.config import TrainSection
from moe_dist.train.sink import Sink
from moe_dist.train.tb_logger import TensorBoardLogger

SKIP = ("load_E", "expert_label_counts")


class MetricsLogger:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.figures_failed = False

    def _active(self) -> list[Sink]:
        return [s for s in self.sinks if s.active]

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        for sink in self._active():
            sink.scalars(step, values)

    def moe(self, step: int, summary: dict[int, dict[str, Any]], prefix: str = "") -> None:
        """`MoEStatsAccumulator.unpack`'s rows: host values (floats, `load_E` a list)."""
        for layer, row in summary.items():
            base = f"moe/layer{layer}/{prefix}"
            self.scalars(step, {base + name: value for name, value in row.items() if name not in SKIP})
            for sink in self._active():
                sink.histogram(f"{base}expert_load", row["load_E"], step)

    def expert_domain_heatmap(self, step: int, layer: int, joint_EL, domain_names: list[str]) -> None:
        """P(expert | domain) as an image (columns are domains, each sums to 1), drawn once for
        every sink."""
        sinks = self._active()
        if not sinks or self.figures_failed:
            return
        try:
            fig = draw_heatmap(layer, joint_EL, domain_names)
        except Exception as e:  # noqa: BLE001 - a side channel, as the sinks' writes
            self.figures_failed = True
            print(f"warning: drawing the expert-by-domain heatmap failed ({type(e).__name__}: {e}); no heatmaps "
                  f"for the rest of this run, training goes on", file=sys.stderr, flush=True)
            return
        try:
            for sink in sinks:
                sink.figure(f"moe/layer{layer}/expert_by_domain", fig, step)
        finally:
            import matplotlib.pyplot as plt

            with contextlib.suppress(Exception):
                plt.close(fig)

    def flush(self) -> None:
        for sink in self._active():
            sink.flush()

    def close(self) -> None:
        for sink in self._active():
            sink.close()


def draw_heatmap(layer: int, joint_EL, domain_names: list[str]):
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    from moe_dist.evaluate.heatmap import draw_expert_by_domain

    E, L = len(joint_EL), len(joint_EL[0])
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * L, 1.0 + 0.3 * E))
    draw_expert_by_domain(fig, ax, joint_EL, domain_names, layer)
    fig.tight_layout()
    return fig


def build_metrics_logger(train: TrainSection, enabled: bool, run_config: dict[str, Any],
                         run_id: str | None) -> MetricsLogger:
    """The sinks `train` asks for, opened on rank 0 (`enabled`); none elsewhere."""
    if not enabled:
        return MetricsLogger([])
    sinks: list[Sink] = []
    if train.tensorboard_dir:
        sinks.append(TensorBoardLogger(train.tensorboard_dir, enabled=True))
    if train.wandb is not None or train.mlflow is not None:
        from moe_dist.train.trackers import MlflowSink, WandbSink

        if train.wandb is not None:
            sinks.append(WandbSink(train.wandb, run_config, run_id or "run"))
        if train.mlflow is not None:
            sinks.append(MlflowSink(train.mlflow, run_config, run_id or "run"))
    return MetricsLogger(sinks)


# section -> (module to import, the extra that installs it)
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_tracker_packages(train: TrainSection) -> None:
    """A tracker the config asks for must be installed: refused before the run starts, not
    warned about at its first log line."""
    for section, (module, extra) in TRACKER_PACKAGES.items():
        if getattr(train, section) is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.{section} is set but the {module!r} package is not installed; install the "
                              f"extra: pip install -e '.[{extra}]' (or remove train.{section})")
