"""End to end with the real `deepspeed` launcher on 2 CPU processes: a corpus preprocessed with a
local Hugging Face tokenizer (`tokenizer.kind: hf`), a dense model trained on it from a
consolidated checkpoint, and the same dense model upcycled (G=2: slices) and trained with
`train.init_from` under ep_size 2. The upcycled run's first loss (before any update) is the dense
run's: the MoE model computes the dense function on the very batches training feeds it. Then
the dense run's training checkpoint is upcycled as well (G=1) and matches its model's logits."""

from __future__ import annotations


import pytest
import torch
from tests.harness import load_tool
from tests.harness.tiny_hf_tokenizer import LINES, build_tokenizer_dir, write_jsonl
from tests.harness.train import assert_launch_ok, free_port, launch, logged_losses, tiny_config, write_yaml

from moe_dist.checkpoint import load_consolidated, open_checkpoint, save_consolidated
from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint, full_state_dict
from moe_dist.checkpoint.upcycle import router_has_scale, upcycle
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer

DENSE = dict(vocab_size=322, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32, moe_every=0,
             moe_offset=0, num_labels=0, init_std=0.1)


def _preprocess(argv: list[str]) -> None:
    assert load_tool("preprocess_data").main(argv) == 0


def _train(tmp_path, name: str, cfg: dict) -> list[float]:
    config = write_yaml(str(tmp_path / f"{name}.yaml"), cfg)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config])
    assert_launch_ok(proc)
    return logged_losses(proc.stdout)


@pytest.mark.slow
def test_upcycled_model_trains_under_ep2_starting_from_the_dense_loss(tmp_path):
    tok = build_tokenizer_dir(str(tmp_path / "tok"))
    corpus = write_jsonl(str(tmp_path / "docs.jsonl"), LINES * 3)
    _preprocess(["--input", corpus, "--output-prefix", str(tmp_path / "docs"), "--hf-tokenizer", tok,
                 "--cache-dir", str(tmp_path / "cache")])
    data = dict(kind="megatron", synthetic=None, tokenizer={"kind": "hf", "path": tok},
                megatron={"prefixes": [str(tmp_path / "docs")], "split": "90,10"})

    dense = MoETransformer(parse_model_config(DENSE), seed=4)
    dense_dir = save_consolidated(dense, str(tmp_path / "dense"), data={"tokenizer": data["tokenizer"]})
    up_dir = str(tmp_path / "upcycled")
    upcycle(dense_dir, up_dir, 4, 2, 2, slice_scale="router" if router_has_scale() else "output", progress=False)
    up = ConsolidatedCheckpoint.open(up_dir).config

    train = dict(steps=2, log_interval=1, eval_interval=0, init_from=dense_dir)
    dense_cfg = tiny_config(model=DENSE, data=data,
                            train={**train, "checkpoint_dir": str(tmp_path / "dense_ckpt")})
    dense_cfg.pop("moe")
    dense_losses = _train(tmp_path, "dense", dense_cfg)

    moe_cfg = tiny_config(model=up["model"], data=data, train={**train, "steps": 3, "init_from": up_dir})
    moe_cfg["moe"] = {**up["moe"], "ep_size": 2}
    moe_losses = _train(tmp_path, "moe", moe_cfg)
    print(f"first losses: dense {dense_losses}, upcycled {moe_losses}")
    assert len(dense_losses) == 2 and len(moe_losses) == 3
    assert all(0 < loss < 10 for loss in moe_losses)
    # Printed with 4 decimals; the two runs reduce in different orders.
    assert abs(moe_losses[0] - dense_losses[0]) < 3e-4, (dense_losses, moe_losses)

    # A training checkpoint as SRC (the dense run's, after its 2 steps).
    trained = open_checkpoint(str(tmp_path / "dense_ckpt"))
    assert trained.step == 2
    dense.load_state_dict(full_state_dict(trained, progress=False))
    result = upcycle(str(tmp_path / "dense_ckpt"), str(tmp_path / "from_training"), 4, 2, progress=False)
    assert result.source_kind == "training"
    moe = MoETransformer(ConsolidatedCheckpoint.open(result.out).model_cfg)
    load_consolidated(moe, result.out)
    x = torch.randint(0, 322, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moe.eval()(x).logits_BSV, dense.eval()(x).logits_BSV, atol=2e-5, rtol=1e-5)
