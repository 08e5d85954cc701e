"""The trainer's one logging interface (moe_dist/train/metrics_log.py): every sink gets the same
tags; a sink that fails warns once and is off while the others go on; the W&B and MLflow sinks
write offline (W&B offline mode, an MLflow file store) what TensorBoard does, read back here."""

from __future__ import annotations

import importlib.util

import pytest

from moe_dist.common.config import ConfigError, from_dict
from moe_dist.train.config import TrainSection
from moe_dist.train.metrics_log import MetricsLogger, build_metrics_logger, check_tracker_packages
from moe_dist.train.sink import Sink

SUMMARY = {1: {"dropped_fraction": 0.25, "load_cv": 0.5, "mi_domain": None, "load_E": [3.0, 1.0, 0.0, 4.0],
               "expert_label_counts": [[1, 0], [0, 1]]}}
JOINT = [[3.0, 1.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]]


class Recorder(Sink):
    name = "Recorder"

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__("memory")
        self.writer = object()
        self.fail_on = fail_on
        self.calls: list[tuple] = []

    def _maybe_fail(self, what: str) -> None:
        if what == self.fail_on:
            raise OSError(28, "No space left on device")

    def write_scalars(self, step, values):
        self._maybe_fail("scalars")
        self.calls += [("scalar", tag, step, v) for tag, v in values.items()]

    def write_histogram(self, tag, load, step):
        self._maybe_fail("histogram")
        self.calls.append(("histogram", tag, step, tuple(load)))

    def write_figure(self, tag, fig, step):
        self._maybe_fail("figure")
        self.calls.append(("figure", tag, step, type(fig).__name__))


def log_everything(logger: MetricsLogger) -> None:
    for step in (1, 2):
        logger.scalars(step, {"train/loss": 2.0, "train/mfu": None})
        logger.moe(step, SUMMARY)
        logger.expert_domain_heatmap(step, 1, JOINT, ["a", "b"])
        logger.flush()
    logger.close()


def test_every_sink_gets_the_same_tags():
    a, b = Recorder(), Recorder()
    log_everything(MetricsLogger([a, b]))
    assert a.calls == b.calls
    assert ("scalar", "train/loss", 2, 2.0) in a.calls and not any(c[1] == "train/mfu" for c in a.calls)
    assert ("scalar", "moe/layer1/dropped_fraction", 1, 0.25) in a.calls
    assert ("histogram", "moe/layer1/expert_load", 1, (3.0, 1.0, 0.0, 4.0)) in a.calls
    assert ("figure", "moe/layer1/expert_by_domain", 2, "Figure") in a.calls


@pytest.mark.parametrize("fail_on", ["scalars", "histogram", "figure"])
def test_a_failing_sink_warns_once_and_the_others_go_on(fail_on, capsys):
    broken, healthy, reference = Recorder(fail_on=fail_on), Recorder(), Recorder()
    log_everything(MetricsLogger([broken, healthy]))
    log_everything(MetricsLogger([reference]))
    err = capsys.readouterr().err
    assert err.count("warning: Recorder writing to 'memory' failed") == 1
    assert f"{fail_on}: OSError" in err and "training goes on" in err
    assert healthy.calls == reference.calls and not broken.active


def test_no_sinks_off_rank_0_and_a_missing_tracker_package_is_a_config_error(tmp_path, monkeypatch):
    train = from_dict(TrainSection, dict(steps=2, seq_len=4, micro_batch=1, deepspeed_config="x.json",
                                         tensorboard_dir=str(tmp_path / "tb"), wandb={"project": "p"}), "train")
    assert build_metrics_logger(train, enabled=False, run_config={}, run_id="r").sinks == []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.wandb is set but the 'wandb' package is not installed; "
                                          r"install the extra: pip install -e '.\[wandb\]'"):
        check_tracker_packages(train)
