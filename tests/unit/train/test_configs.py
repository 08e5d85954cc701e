"""Every shipped config parses strictly, fits the launch it documents, and every shipped
DeepSpeed JSON passes the trainer's checks. GPU configs name data files that only exist on a
prepared cluster, so their data section is swapped for the synthetic corpus here. The `cpu:`
section: its defaults, its checks, and the keys that moved into it from `train:`."""

from __future__ import annotations

import glob
import os

import pytest
import yaml
from tests.harness.train import REPO, tiny_config

from moe_dist.common.config import ConfigError
from moe_dist.parallel.groups import validate_parallel_sizes
from moe_dist.train.config import TrainSection, apply_overrides, parse_run_config
from moe_dist.train.ds_config import gradient_dtypes, load_json, reconcile_deepspeed_config

WORLD = {"tiny_cpu.yaml": 2, "two_corpora_cpu.yaml": 2, "gpu_125m_e16.yaml": 8, "gpu_125m_e16_1gpu.yaml": 1,
         "gpu_1b_active_e64.yaml": 64, "deepseek_v3_tiny_cpu.yaml": 2, "gpu_deepseek_v2_lite.yaml": 16}


def test_every_config_is_listed():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))) == sorted(WORLD)


@pytest.mark.parametrize("name", sorted(WORLD))
def test_config_parses_and_fits_its_launch(name, monkeypatch):
    monkeypatch.chdir(REPO)  # paths in configs are relative to the repository root
    with open(os.path.join("configs", name)) as f:
        raw = yaml.safe_load(f)
    if raw["data"]["kind"] == "megatron":
        raw["data"] = {"kind": "synthetic", "tokenizer": {"kind": "byte"}, "num_workers": raw["data"]["num_workers"]}
    cfg = parse_run_config(raw)
    world = WORLD[name]
    validate_parallel_sizes(world, cfg.model.moe.ep_size, cfg.model.moe.num_experts)
    ds = reconcile_deepspeed_config(load_json(cfg.train.deepspeed_config), cfg.train, world)
    assert ds["train_batch_size"] == cfg.train.micro_batch * cfg.train.grad_accum * world
    assert cfg.model.moe_layer_indices


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "deepspeed", "*.json"))))
def test_deepspeed_json_passes_the_checks(path):
    train = TrainSection(steps=1, seq_len=8, micro_batch=1, deepspeed_config=path)
    ds = reconcile_deepspeed_config(load_json(path), train, world_size=2, path=path)
    assert ds["zero_optimization"]["stage"] in (1, 2)
    assert ds["bf16"]["enabled"] == path.endswith("_bf16.json")
    assert gradient_dtypes(ds) == ("fp32", "fp32")  # reduced and accumulated in fp32, bf16 or not


def test_cpu_section_defaults_and_checks():
    raw = tiny_config()
    del raw["cpu"]
    cfg = parse_run_config(raw)
    assert (cfg.cpu.threads, cfg.cpu.keep_freed_memory) == (None, True)
    assert cfg.to_dict()["cpu"] == {"threads": None, "keep_freed_memory": True}
    cfg = parse_run_config(tiny_config(cpu=dict(threads=3, keep_freed_memory=False)))
    assert (cfg.cpu.threads, cfg.cpu.keep_freed_memory) == (3, False)
    with pytest.raises(ConfigError, match="cpu.threads must be an integer >= 1, got 0"):
        parse_run_config(tiny_config(cpu=dict(threads=0)))
    with pytest.raises(ConfigError, match=r"cpu: unknown key\(s\) \['cpu_threads'\]"):
        parse_run_config(tiny_config(cpu=dict(cpu_threads=1)))


@pytest.mark.parametrize("old,new,value", [("train.cpu_threads", "cpu.threads", 2),
                                           ("train.cpu_keep_freed_memory", "cpu.keep_freed_memory", False)])
def test_cpu_keys_of_the_train_section_name_their_new_place(old, new, value):
    with pytest.raises(ConfigError, match=rf"^{old} moved to {new}$"):
        parse_run_config(apply_overrides(tiny_config(), [f"{old}={value}"]))
