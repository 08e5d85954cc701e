"""What the experiment trackers wrote, read back offline: W&B's offline run file (its record log,
`run-<id>.wandb`) and an MLflow file store. Tests that need a tracker skip with the reason when
its package is not installed (the extras `.[wandb]`, `.[mlflow]`)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import time

import pytest

OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
               "WANDB_ERROR_REPORTING": "false", "MLFLOW_ALLOW_FILE_STORE": "true"}


WRITE_WAIT_S = 120


def need(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {module!r} package is not installed (pip install -e '.[{extra}]')")


def _records(path: str):
    """W&B's record log: LevelDB's log format (32 KiB blocks, 7-byte chunk headers: crc32, length,
    type full/first/middle/last) after a 7-byte file header ':W&B', magic, version."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def wandb_history(wandb_dir: str) -> dict[str, list]:
    """{key: [logged values]} of every offline run under `wandb_dir` (W&B's own keys '_step',
    '_runtime', '_timestamp' left out; a histogram or image appears as '<tag>/_type' and its parts)."""
    from wandb.proto import wandb_internal_pb2

    def parsed(path: str) -> list:
        records = []
        for raw in _records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # noqa: BLE001 - a record still being written: read again later
                break
            records.append(record)
        return records

    out: dict[str, list] = {}
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        # W&B's service process writes the file on its own time, after `finish` has returned:
        # the run is whole once its `exit` record is there.
        deadline = time.monotonic() + WRITE_WAIT_S
        records = parsed(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in records):
            assert time.monotonic() < deadline, f"{path}: no exit record after {WRITE_WAIT_S} s"
            time.sleep(0.5)
            records = parsed(path)
        for record in records:
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        out.setdefault(key, []).append(json.loads(item.value_json))
    return out


def wandb_scalar_tags(history: dict[str, list]) -> set[str]:
    media = {k.rsplit("/", 1)[0] for k in history if k.endswith("/_type")}
    return {k for k in history if not any(k == m or k.startswith(m + "/") for m in media)}


def mlflow_metrics(store: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of every run in the file store at folder `store`."""
    from mlflow.tracking import MlflowClient

    previous = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 refuses its file store otherwise
    try:
        client = MlflowClient(tracking_uri=f"file://{store}")
        out: dict[str, list[tuple[int, float]]] = {}
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                for key in run.data.metrics:
                    out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    finally:
        if previous is None:
            del os.environ["MLFLOW_ALLOW_FILE_STORE"]
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = previous
    return out


def mlflow_artifacts(store: str) -> list[str]:
    return sorted(os.path.relpath(p, store) for p in glob.glob(os.path.join(store, "*", "*", "artifacts", "**"),
                                                               recursive=True) if os.path.isfile(p))
