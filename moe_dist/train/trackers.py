"""Experiment trackers beside TensorBoard: Weights & Biases (`train.wandb`, extra `.[wandb]`) and
MLflow (`train.mlflow`, extra `.[mlflow]`, mlflow-skinny), rank 0 only. They receive what
TensorBoard does (sink.py; the tags: tb_logger.py), under the same names:

- W&B: scalars and the expert-load histogram (`wandb.Histogram`, bucket e = expert e) at the
  trainer's step, the heatmap as a `wandb.Image`; the resolved config as the run's config.
- MLflow: scalars as metrics at the step; the expert-load histogram as one metric per expert,
  `<tag>/expert_<e>` (MLflow has no histograms); the heatmap as an artifact
  `<tag>/step_<step>.png`; the resolved config as the artifact `config.yaml`.

A run keeps one tracker run across `--resume`: W&B's run id is moe_dist's run id (resume
"allow"), and MLflow's run is found again by its tag `moe_dist.run_id`. W&B's console capture is
off (the run folder's train.log holds rank 0's output). A tracker that cannot start (not logged
in, the server unreachable, a folder not writable) or fails later warns once and is off; training
goes on (sink.py). Whether the package is installed is checked in preflight.
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlparse

from moe_dist.train.config import MlflowSection, WandbSection
from moe_dist.train.sink import Sink

RUN_ID_TAG = "moe_dist.run_id"


class WandbSink(Sink):
    name = "W&B"

    def __init__(self, cfg: WandbSection, run_config: dict[str, Any], run_id: str) -> None:
        super().__init__(f"project {cfg.project} ({cfg.mode}, dir {cfg.dir or '.'})")
        self.open_tolerantly(lambda: self._open(cfg, run_config, run_id))

    @staticmethod
    def _open(cfg: WandbSection, run_config: dict[str, Any], run_id: str):
        import wandb

        if cfg.dir:
            os.makedirs(cfg.dir, exist_ok=True)
        return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_id, dir=cfg.dir,
                          mode=cfg.mode, id=run_id, resume="allow", config=run_config,
                          settings=wandb.Settings(console="off", silent=True))

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self.writer.log(values, step=step)

    def write_histogram(self, tag: str, load: list[float], step: int) -> None:
        import wandb

        edges = [i - 0.5 for i in range(len(load) + 1)]
        self.writer.log({tag: wandb.Histogram(np_histogram=(load, edges))}, step=step)

    def write_figure(self, tag: str, fig, step: int) -> None:
        import wandb

        self.writer.log({tag: wandb.Image(fig)}, step=step)

    def write_close(self, writer) -> None:
        writer.finish()


def is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


class MlflowSink(Sink):
    name = "MLflow"

    def __init__(self, cfg: MlflowSection, run_config: dict[str, Any], run_id: str) -> None:
        super().__init__(f"{cfg.tracking_uri} (experiment {cfg.experiment})")
        self.run_id: str | None = None
        self.open_tolerantly(lambda: self._open(cfg, run_config, run_id))

    def _open(self, cfg: MlflowSection, run_config: dict[str, Any], run_id: str):
        if is_file_store(cfg.tracking_uri):
            # MLflow 3 refuses its file store unless told: `tracking_uri` names one on purpose.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
                                   max_results=1)
        if found:  # --resume: the same MLflow run goes on
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=cfg.run_name or run_id, tags={RUN_ID_TAG: run_id})
            self.run_id = run.info.run_id
            client.log_dict(self.run_id, run_config, "config.yaml")
        return client

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.writer.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def write_histogram(self, tag: str, load: list[float], step: int) -> None:
        self.write_scalars(step, {f"{tag}/expert_{e}": v for e, v in enumerate(load)})

    def write_figure(self, tag: str, fig, step: int) -> None:
        self.writer.log_figure(self.run_id, fig, f"{tag}/step_{step:08d}.png")

    def write_close(self, writer) -> None:
        writer.set_terminated(self.run_id)
