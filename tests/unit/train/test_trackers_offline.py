"""The W&B and MLflow sinks (moe_dist/train/trackers.py) offline: W&B in offline mode and an MLflow
file store, both in the test's folder, receive the scalars, the expert-load histogram and the
heatmap under TensorBoard's tags; nothing reaches the network. Skipped, with the reason, where the
extras are not installed."""

from __future__ import annotations

import pytest
from tests.harness.trackers import OFFLINE_ENV, mlflow_artifacts, mlflow_metrics, need, wandb_history, wandb_scalar_tags

from moe_dist.train.config import MlflowSection, WandbSection
from moe_dist.train.metrics_log import MetricsLogger

SUMMARY = {1: {"dropped_fraction": 0.25, "load_cv": 0.5, "load_E": [3.0, 1.0, 0.0, 4.0]}}
JOINT = [[3.0, 1.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]]


def log_run(logger: MetricsLogger) -> None:
    for step in (1, 2):
        logger.scalars(step, {"train/loss": 3.0 - step, "train/lr": 1e-3})
        logger.moe(step, SUMMARY)
    logger.expert_domain_heatmap(2, 1, JOINT, ["a", "b"])
    logger.close()


@pytest.fixture
def offline(monkeypatch):
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)


def test_wandb_offline_gets_the_scalars_histogram_and_heatmap(tmp_path, offline):
    need("wandb", "wandb")
    from moe_dist.train.trackers import WandbSink

    sink = WandbSink(WandbSection(project="moe", dir=str(tmp_path), mode="offline"), {"train": {"lr": 1e-3}},
                     "run0123")
    assert sink.active
    log_run(MetricsLogger([sink]))
    history = wandb_history(str(tmp_path))
    assert wandb_scalar_tags(history) == {"train/loss", "train/lr", "moe/layer1/dropped_fraction",
                                          "moe/layer1/load_cv"}
    assert history["train/loss"] == [2.0, 1.0]
    assert history["moe/layer1/expert_load/_type"] == ["histogram", "histogram"]
    assert history["moe/layer1/expert_load/values"][0] == [3, 1, 0, 4]
    assert history["moe/layer1/expert_by_domain/_type"] == ["image-file"]


def test_mlflow_file_store_gets_the_scalars_histogram_and_heatmap(tmp_path, offline):
    need("mlflow", "mlflow")
    from moe_dist.train.trackers import MlflowSink

    store = tmp_path / "mlruns"
    sink = MlflowSink(MlflowSection(tracking_uri=f"file://{store}"), {"train": {"lr": 1e-3}}, "run0123")
    assert sink.active
    log_run(MetricsLogger([sink]))
    metrics = mlflow_metrics(str(store))
    assert metrics["train/loss"] == [(1, 2.0), (2, 1.0)]
    assert metrics["moe/layer1/expert_load/expert_3"] == [(1, 4.0), (2, 4.0)]
    assert {"train/loss", "train/lr", "moe/layer1/dropped_fraction", "moe/layer1/load_cv"} < set(metrics)
    artifacts = mlflow_artifacts(str(store))
    assert any(a.endswith("artifacts/config.yaml") for a in artifacts)
    assert any(a.endswith("artifacts/moe/layer1/expert_by_domain/step_00000002.png") for a in artifacts)
    # --resume: the same moe_dist run id continues the same MLflow run
    again = MlflowSink(MlflowSection(tracking_uri=f"file://{store}"), {}, "run0123")
    assert again.run_id == sink.run_id
    again.close()


def test_a_tracker_that_cannot_start_warns_and_is_off(tmp_path, offline, capsys):
    need("mlflow", "mlflow")
    from moe_dist.train.trackers import MlflowSink

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    sink = MlflowSink(MlflowSection(tracking_uri=f"file://{blocker}/mlruns"), {}, "run0123")
    assert not sink.active
    log_run(MetricsLogger([sink]))  # nothing raised
    err = capsys.readouterr().err
    assert err.count("warning: MLflow writing to") == 1 and "opening:" in err and "training goes on" in err
