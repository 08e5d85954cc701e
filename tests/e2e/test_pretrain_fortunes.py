"""End to end with the real `deepspeed` launcher: train a SentencePiece tokenizer and preprocess
a multilingual sample of the shared fortunes corpus with the data tools, then pretrain a few steps
on 2 CPU processes with ep_size 2; TensorBoard's own reader finds every tag with finite values."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
from tests.harness.train import (REPO, assert_launch_ok, free_port, launch, logged_losses, tensorboard_scalars,
                           tensorboard_tags, tiny_config, write_yaml)

FORTUNES = sorted(glob.glob(os.path.join(REPO, "..", "shared", "data", "fortunes_*.jsonl")))
RECORDS_PER_LANGUAGE = 300


def sample_corpus(tmp_path) -> list[str]:
    """The first records of each language: enough text for a tokenizer, seconds to preprocess."""
    paths = []
    for src in FORTUNES:
        dst = tmp_path / os.path.basename(src)
        with open(src) as f, open(dst, "w") as out:
            for _, line in zip(range(RECORDS_PER_LANGUAGE), f):
                out.write(line)
        paths.append(str(dst))
    return paths


def run_tool(*args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not FORTUNES, reason="../shared/data/fortunes_*.jsonl not present (shared data folder "
                                         "beside the checkout)")
def test_pretrain_on_fortunes_with_the_deepspeed_launcher(tmp_path):
    corpus = sample_corpus(tmp_path)
    run_tool("tools/train_tokenizer.py", "--input", *corpus, "--output-prefix", str(tmp_path / "tok"),
             "--vocab-size", "384", "--model-type", "bpe")
    # One prefix per corpus (docs/data.md): each split then holds every language.
    prefixes = [str(tmp_path / f"fortunes_{i}") for i in range(len(corpus))]
    for path, prefix in zip(corpus, prefixes):
        run_tool("tools/preprocess_data.py", "--input", path, "--output-prefix", prefix,
                 "--tokenizer-model", str(tmp_path / "tok.model"), "--label-key", "lang")

    tb = tmp_path / "tb"
    cfg = tiny_config(
        model=dict(vocab_size=384, num_labels=3),
        data=dict(kind="megatron", synthetic=None,
                  tokenizer={"kind": "sentencepiece", "model": str(tmp_path / "tok.model")},
                  megatron={"prefixes": prefixes, "split": "90,10"}),
        train=dict(steps=4, log_interval=2, eval_interval=4, tensorboard_dir=str(tb),
                   checkpoint_dir=str(tmp_path / "ckpt")))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", config])
    assert_launch_ok(proc)
    assert "world 2, ep_size 2" in proc.stdout
    assert len(logged_losses(proc.stdout)) == 2

    scalars = tensorboard_scalars(str(tb))
    expected = ["train/loss", "train/perplexity", "train/aux_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "val/loss", "val/perplexity"]
    layer = "moe/layer1/"  # the tiny model's only MoE layer
    expected += [layer + name for name in ("dropped_fraction", "load_cv", "load_max_over_mean", "entropy_token",
                                           "entropy_mean", "entropy_load", "loss_switch", "loss_z_loss",
                                           "loss_importance", "mi_domain", "mi_domain_normalized",
                                           "val_mi_domain_normalized")]
    for tag in expected:
        assert tag in scalars, f"missing TensorBoard tag {tag}; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), f"{tag}: {scalars[tag]}"
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    assert 0.0 <= scalars[layer + "mi_domain_normalized"][-1][1] <= 1.0
    tags = tensorboard_tags(str(tb))
    assert layer + "expert_load" in tags["histograms"]
    assert layer + "expert_by_domain" in tags["images"]

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (ckpt / "step_00000004").glob("moe_experts_ep*.pt")) == [
        "moe_experts_ep000.pt", "moe_experts_ep001.pt"]
    names = [json.loads(open(prefix + ".labels.json").read())["names"] for prefix in prefixes]
    assert sorted(n for each in names for n in each) == ["de", "en", "es"]  # one language per prefix
