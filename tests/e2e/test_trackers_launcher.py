"""Through the `deepspeed` launcher (2 CPU ranks): W&B (offline mode) and MLflow (a file store)
receive the same scalar names as TensorBoard, the histograms and the heatmap; the step log shows
peak memory (and says why there is no MFU on CPU); validation reports each domain; the run folder
holds the resolved config, the DeepSpeed JSON, the launch record and rank 0's log. A tracker that
cannot start warns and the run goes on to exit 0 (issue 24, acceptance 2 and 3). Nothing reaches
the network: W&B is offline, MLflow writes files in the test's folder."""

from __future__ import annotations

import json
import os

import pytest
from tests.harness.train import (assert_launch_ok, free_port, launch, tensorboard_scalars, tensorboard_tags, tiny_config,
                                 write_yaml)
from tests.harness.trackers import (OFFLINE_ENV, mlflow_artifacts, mlflow_metrics, need, wandb_history,
                                    wandb_scalar_tags)


def run(tmp_path, **train) -> tuple[str, object]:
    cfg = tiny_config(train=dict(steps=4, log_interval=2, eval_interval=2, tensorboard_dir=str(tmp_path / "tb"),
                                 run_dir=str(tmp_path / "run"), **train))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    return config, launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                           "--config", config], env=OFFLINE_ENV)


def test_wandb_and_mlflow_get_tensorboards_scalar_names_and_the_run_folder_explains_itself(tmp_path):
    need("wandb", "wandb")
    need("mlflow", "mlflow")
    store = tmp_path / "mlruns"
    _, proc = run(tmp_path, wandb={"project": "moe", "dir": str(tmp_path / "wb"), "mode": "offline"},
                  mlflow={"tracking_uri": f"file://{store}", "experiment": "e2e"})
    assert_launch_ok(proc)
    tb = set(tensorboard_scalars(str(tmp_path / "tb")))
    assert {"train/loss", "train/peak_memory_gib", "val/loss", "val/domain/domain0/loss",
            "moe/layer1/load_cv"} <= tb, sorted(tb)
    assert "train/mfu" not in tb  # CPU: no peak, no MFU
    history = wandb_history(str(tmp_path / "wb"))
    assert wandb_scalar_tags(history) == tb
    mlflow = set(mlflow_metrics(str(store)))
    assert {m for m in mlflow if "/expert_load/expert_" not in m} == tb
    # the histograms and the heatmap, in each
    tags = tensorboard_tags(str(tmp_path / "tb"))
    assert "moe/layer1/expert_load" in tags["histograms"] and "moe/layer1/expert_by_domain" in tags["images"]
    assert history["moe/layer1/expert_load/_type"][0] == "histogram"
    assert history["moe/layer1/expert_by_domain/_type"][0] == "image-file"
    assert {"moe/layer1/expert_load/expert_0", "moe/layer1/expert_load/expert_3"} <= mlflow
    assert any(a.endswith("moe/layer1/expert_by_domain/step_00000004.png") for a in mlflow_artifacts(str(store)))

    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step 4/4 | loss")]
    assert len(step_lines) == 1 and " | peak mem " in step_lines[0] and "MFU" not in step_lines[0]
    assert "no MFU: no peak FLOP/s known for cpu (set train.peak_tflops)" in proc.stdout
    assert "step 4 | validation per domain (loss / perplexity / tokens): domain0 " in proc.stdout
    # every synthetic token is labelled: the token-weighted mean of the domains is the validation loss
    line = next(l for l in proc.stdout.splitlines() if l.startswith("step 4 | validation per domain"))
    parts = [p.split() for p in line.split(": ", 1)[1].split(", ")]
    domains = {name: (float(loss), int(tokens.replace(",", ""))) for name, loss, _, _, _, tokens in parts}
    assert set(domains) <= {f"domain{d}" for d in range(4)} and len(domains) >= 2
    weighted = sum(loss * n for loss, n in domains.values()) / sum(n for _, n in domains.values())
    assert abs(weighted - dict(tensorboard_scalars(str(tmp_path / "tb"))["val/loss"])[4]) < 1e-3

    run_dir = tmp_path / "run"
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "deepspeed_config.json", "launch.json", "train.log"]
    launch_record = json.loads((run_dir / "launch.json").read_text())
    assert launch_record["env"]["WORLD_SIZE"] == "2" and "launch/pretrain.py" in " ".join(launch_record["argv"])
    assert any("--num_gpus" in cmd for cmd in map(" ".join, launch_record["launchers"]))
    assert json.loads((run_dir / "deepspeed_config.json").read_text())["train_batch_size"] == 8
    log = (run_dir / "train.log").read_text()
    assert step_lines[0] in log and "done: step 4" in log


@pytest.mark.slow  # a second launch; the unit tests (test_metrics_sinks, test_trackers_offline) cover the warning
def test_trackers_that_fail_warn_once_and_training_exits_0(tmp_path):
    need("wandb", "wandb")
    need("mlflow", "mlflow")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    _, proc = run(tmp_path, wandb={"project": "moe", "dir": str(blocker / "wb"), "mode": "offline"},
                  mlflow={"tracking_uri": f"file://{blocker}/mlruns"})
    assert_launch_ok(proc)
    output = proc.stdout + proc.stderr
    assert output.count("warning: W&B writing to") == 1 and output.count("warning: MLflow writing to") == 1
    assert "training goes on" in output and "done: step 4" in output
    assert "train/loss" in tensorboard_scalars(str(tmp_path / "tb"))  # the other sink went on
