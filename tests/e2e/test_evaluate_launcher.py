"""tools/evaluate.py on a training checkpoint of the quickstart config (shortened), in one process
and under the `deepspeed` launcher at world 2 / EP 2 (same code, sums all-reduced, ragged last
round): the same loss and token counts; the consolidated checkpoint gives them too, and
tools/generate.py the same text from both. The short
run also checks the trainer's validation: a stated token count, its standard error, eval drops
and load in TensorBoard."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from tests.harness import load_tool
from tests.harness.train import REPO, assert_launch_ok, free_port, launch, tensorboard_scalars, write_yaml

from moe_dist.checkpoint import consolidate

DOCS = [{"text": "abcabcabd " * (i % 4 + 1) + "xyz", "lang": ["en", "fr", "de"][i % 3]} for i in range(23)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    with open(os.path.join(REPO, "configs/tiny_cpu.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(steps=4, warmup_steps=1, log_interval=2, eval_interval=2, eval_tokens=1100,
                        checkpoint_dir=str(tmp / "ckpt"), tensorboard_dir=str(tmp / "tb"),
                        run_dir=str(tmp / "run"))
    cfg["cpu"] = {"threads": 1}
    config = write_yaml(str(tmp / "quick.yaml"), cfg)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config])
    assert_launch_ok(proc)
    data = tmp / "held_out.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return tmp, proc.stdout, str(data)


def test_trainer_validation_states_its_token_count_and_precision(run):
    tmp, stdout, _ = run
    # 1100 tokens round up to whole micro batches: 2 per rank of 8 sequences x 64 tokens, 2 ranks
    lines = [line for line in stdout.splitlines() if "validation loss" in line]
    assert len(lines) == 2 and all("over 2,048 tokens" in line and " ± " in line for line in lines), lines
    scalars = tensorboard_scalars(str(tmp / "tb"))
    assert [s for s, _ in scalars["val/loss_sem"]] == [2, 4] and all(v > 0 for _, v in scalars["val/loss_sem"])
    assert all(v == 0.0 for _, v in scalars["moe/layer0/val_dropped_fraction"])  # dropless at eval
    assert "moe/layer3/val_load_cv" in scalars


def test_launcher_ep2_equals_one_process_and_consolidated(run):
    tmp, _, data = run
    args = ["--data", data, "--label-key", "lang", "--batch", "3", "--no-progress"]
    one = tmp / "one.json"
    assert load_tool("evaluate").main([str(tmp / "ckpt"), *args, "--json", str(one)]) == 0
    two = tmp / "two.json"
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "tools/evaluate.py", str(tmp / "ckpt"),
                   *args, "--json", str(two)], env={"PYTHONPATH": REPO})
    assert_launch_ok(proc)
    consolidate(str(tmp / "ckpt"), str(tmp / "consolidated"), progress=False)
    cons = tmp / "cons.json"
    assert load_tool("evaluate").main([str(tmp / "consolidated"), *args, "--json", str(cons)]) == 0
    a, b, c = (json.loads(p.read_text()) for p in (one, two, cons))
    assert a["tokens"] == b["tokens"] == c["tokens"] > 0
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert c["loss"] == pytest.approx(a["loss"], abs=1e-6)
    for name, d in a["domains"].items():
        assert b["domains"][name]["tokens"] == d["tokens"]
        assert b["domains"][name]["loss"] == pytest.approx(d["loss"], abs=1e-5)
    assert set(a["moe_layers"]) == {"0", "1", "2", "3"}


def test_generate_on_the_training_checkpoint_equals_the_consolidated(run, capsys):
    tmp, _, _ = run
    if not (tmp / "consolidated").exists():
        consolidate(str(tmp / "ckpt"), str(tmp / "consolidated"), progress=False)
    args = ["--prompt", "abc", "--prompt", "a longer prompt", "--max-new-tokens", "20", "--json"]
    outs = []
    for ckpt in (tmp / "ckpt", tmp / "consolidated"):  # ep_size 2 (merged in memory), then 1
        assert load_tool("generate").main([str(ckpt), *args]) == 0
        outs.append([r["ids"] for r in json.loads(capsys.readouterr().out)])
    assert outs[0] == outs[1] and all(len(ids) > 0 for ids in outs[0])
