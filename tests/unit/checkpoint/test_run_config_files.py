"""The run config beside a consolidated checkpoint made for training (issue 24): upcycle writes one
as import-hf does; paths inside the folder the command ran in are relative (a project folder
moves whole), and the defaults take a short trial run (`--set train.steps=20`)."""

from __future__ import annotations

import os

import pytest
import yaml
from tests.harness.hf import build_hf, save_hf

from moe_dist.checkpoint import import_hf, load_consolidated, save_consolidated
from moe_dist.checkpoint.cli import main as cli_main
from moe_dist.checkpoint.hf.importer import RUN_CONFIG_FILE
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.config import apply_overrides, parse_run_config

DENSE = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32, moe_every=0)


def short_trial(out: str):
    """The run config with the synthetic corpus in place of the one still to preprocess, and a
    20-step trial as the header suggests."""
    with open(os.path.join(out, RUN_CONFIG_FILE)) as f:
        text = f.read()
    assert "--set train.steps=20" in text
    run = yaml.safe_load(text)
    tokenizer = run["data"]["tokenizer"]
    run["data"] = {"kind": "synthetic", "tokenizer": {"kind": "byte"}}
    return tokenizer, parse_run_config(apply_overrides(run, ["train.steps=20"]))


def test_upcycle_writes_a_run_config_with_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_consolidated(MoETransformer(parse_model_config(DENSE), seed=1), "dense")
    # through the command line, which also makes OUT's parent folder
    assert cli_main(["upcycle", "dense", "out/moe", "--num-experts", "4", "--top-k", "2", "--quiet"]) == 0
    tokenizer, cfg = short_trial("out/moe")
    assert tokenizer == {"kind": "byte"}
    assert cfg.train.init_from == os.path.join("out", "moe") and cfg.train.warmup_steps <= 20
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.top_k == 2
    model = MoETransformer(cfg.model)
    load_consolidated(model, cfg.train.init_from)  # the path works from the folder it names it from


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_import_hf_run_config_paths_and_trial_defaults(tmp_path, monkeypatch, where):
    src = save_hf(build_hf("qwen2_moe"), str(tmp_path / "hf"))
    work = tmp_path if where == "inside" else tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    import_hf(src, str(tmp_path / "cons"), progress=False)
    tokenizer, cfg = short_trial(str(tmp_path / "cons"))
    if where == "inside":
        assert (cfg.train.init_from, tokenizer["path"]) == ("cons", "hf")
    else:  # a path outside the folder stays absolute
        assert (cfg.train.init_from, tokenizer["path"]) == (str(tmp_path / "cons"), src)
