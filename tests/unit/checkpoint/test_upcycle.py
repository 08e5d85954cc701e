"""`convert_checkpoint.py upcycle`: the upcycled MoE model computes the dense source's logits at
step 0 (fp32 tolerance) for full copies (G=1) and slices (G>1), through the consolidated files
and `load_consolidated`; a router without the slice structure does not (the check can fail);
bad arguments and sources are errors naming the value, with nothing written to OUT. One process.
Training from an upcycled checkpoint under EP=2: tests/e2e/test_upcycle_train.py."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from moe_dist.checkpoint import cli, load_consolidated, save_consolidated
from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.upcycle import router_has_scale, upcycle, upcycle_state
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer

VOCAB, SEQ = 97, 24
# A large init makes every FFN matter to the logits, so a wrong expert or weight shows.
DENSE = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=SEQ, init_std=0.2)
ROUTER_SCALE = pytest.mark.skipif(not router_has_scale(), reason="the topk router has no `scale` key yet "
                                                                 "(model-features)")


def dense_model(**overrides) -> MoETransformer:
    return MoETransformer(parse_model_config({**DENSE, "moe_every": 0, **overrides}), seed=5)


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(11))


def logits(model: MoETransformer, train: bool = False) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(tokens()).logits_BSV


def load_out(out: str) -> MoETransformer:
    model = MoETransformer(ConsolidatedCheckpoint.open(out).model_cfg, seed=1)  # other weights until loaded
    load_consolidated(model, out)
    return model


def read_meta(out: str) -> dict:
    with open(os.path.join(out, "moe_dist.json")) as f:
        return json.load(f)


@pytest.fixture
def dense_ckpt(tmp_path):
    model = dense_model()
    return model, save_consolidated(model, str(tmp_path / "dense"))


CASES = [  # (num_experts, top_k, granularity, options)
    (4, 2, 1, {}),
    (8, 1, 1, {}),
    (4, 4, 1, {"moe_every": 2, "moe_offset": 1}),
    (4, 2, 2, {"slice_scale": "output"}),
    (6, 2, 2, {"slice_scale": "output"}),  # 3 copies of 2 slices: each token picks one copy
    (8, 4, 4, {"slice_scale": "output"}),
    (12, 6, 3, {"slice_scale": "output", "router_std": 0.02}),
    pytest.param(4, 2, 2, {"slice_scale": "router"}, marks=ROUTER_SCALE),
    pytest.param(8, 4, 4, {"slice_scale": "router"}, marks=ROUTER_SCALE),
]


@pytest.mark.parametrize("E, K, G, options", CASES)
def test_upcycled_logits_equal_the_dense_model_s(dense_ckpt, tmp_path, E, K, G, options):
    dense, src = dense_ckpt
    out = str(tmp_path / "moe")
    result = upcycle(src, out, E, K, G, progress=False, **options)
    moe = load_out(out)
    cfg = moe.cfg
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff) == (E, K, DENSE["d_ff"] // G)
    assert cfg.moe.dropless and cfg.moe.router.renormalize
    assert result.moe_layers == cfg.moe_layer_indices == ([1] if options.get("moe_every") == 2 else [0, 1, 2])
    ref = logits(dense)
    for train in (False, True):  # dropless: training-mode routing is the same
        assert torch.allclose(logits(moe, train), ref, atol=2e-5, rtol=1e-5), (logits(moe, train) - ref).abs().max()
    assert ref.abs().max() > 1.0  # logits of some size, not all near zero


def _break_router_structure(state: dict, layer: int) -> None:
    key = f"blocks.{layer}.moe.router.gate.weight_ED"
    state[key] = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("G", [1, 2])
def test_the_equality_check_fails_without_renormalized_whole_copies(G):
    """The equality above depends on the router's structure: without renormalization (G=1) or
    with rows that differ between a copy's slices (G=2) the logits move."""
    dense = dense_model()
    cfg, state = upcycle_state(dense.cfg, dense.state_dict(), 4, 2, G, slice_scale="output")
    if G == 1:
        cfg.moe.router.renormalize = False
    else:
        _break_router_structure(state, 0)
    moe = MoETransformer(cfg)
    moe.load_state_dict(state)
    assert (logits(moe) - logits(dense)).abs().max() > 1e-2


def test_experts_are_copies_or_slices_and_noise_is_seeded():
    dense = dense_model()
    w_in, w_out = dense.state_dict()["blocks.0.ffn.w_in_DI"], dense.state_dict()["blocks.0.ffn.w_out_FD"]
    _, state = upcycle_state(dense.cfg, dense.state_dict(), 6, 2, 2, slice_scale="output")
    e_in, e_out = state["blocks.0.moe.experts.w_in_EDI"], state["blocks.0.moe.experts.w_out_EFD"]
    F, f = 48, 24
    for e in range(6):  # expert c * G + s: slice s of the gate and up units, output rows times G
        s = e % 2
        assert torch.equal(e_in[e], torch.cat([w_in[:, s * f:(s + 1) * f], w_in[:, F + s * f:F + (s + 1) * f]], 1))
        assert torch.equal(e_out[e], w_out[s * f:(s + 1) * f] * 2)
    gate = state["blocks.0.moe.router.gate.weight_ED"]
    assert torch.equal(gate[0], gate[1]) and not torch.equal(gate[0], gate[2])
    noisy = [upcycle_state(dense.cfg, dense.state_dict(), 4, 2, expert_noise=0.05, seed=s)[1] for s in (1, 1, 2)]
    w = noisy[0]["blocks.0.moe.experts.w_in_EDI"]
    assert not torch.equal(w[0], w[1])  # the copies differ
    assert 0.02 < ((w[0] - w_in).std() / w_in.std()).item() < 0.08
    assert torch.equal(w, noisy[1]["blocks.0.moe.experts.w_in_EDI"])
    assert not torch.equal(w, noisy[2]["blocks.0.moe.experts.w_in_EDI"])


def test_gelu_model():
    dense = dense_model(activation="gelu")
    cfg, state = upcycle_state(dense.cfg, dense.state_dict(), 4, 2, 2, slice_scale="output")
    moe = MoETransformer(cfg)
    moe.load_state_dict(state)
    assert torch.allclose(logits(moe), logits(dense), atol=2e-5, rtol=1e-5)


def test_cli_writes_a_checkpoint_inspect_reads(dense_ckpt, tmp_path, capsys):
    _, src = dense_ckpt
    out = str(tmp_path / "moe")
    assert cli.main(["upcycle", src, out, "--num-experts", "4", "--top-k", "2", "--quiet", "--seed", "3"]) == 0
    assert f"train it with train.init_from={out}" in capsys.readouterr().out
    meta = read_meta(out)
    assert meta["source"]["upcycled_from"] == os.path.abspath(src) and meta["source"]["seed"] == 3
    assert meta["config"]["moe"]["router"] == {**meta["config"]["moe"]["router"], "type": "topk", "renormalize": True}
    assert meta["buffers"] == [f"blocks.{i}.moe.router.selection_bias_E" for i in range(3)]
    assert cli.main(["inspect", out]) == 0
    assert "experts per MoE layer: [4], top_k 2" in capsys.readouterr().out


def test_hf_source_records_its_tokenizer(tmp_path, monkeypatch):
    """The HF path (moe_dist.checkpoint.hf.importer.read_hf_model stubbed with a dense moe_dist
    model): its directory becomes the run's `tokenizer: {kind: hf}`."""
    import moe_dist.checkpoint.upcycle as up

    dense = dense_model()
    hf = tmp_path / "hf"
    os.makedirs(hf)
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(up, "_read_hf", lambda path, spec: (dense.cfg, dense.state_dict()))
    out = str(tmp_path / "moe")
    assert upcycle(str(hf), out, 4, 2, progress=False).source_kind == "hf"
    meta = read_meta(out)
    assert meta["config"]["data"]["tokenizer"] == {"kind": "hf", "model": None, "path": str(hf), "add_bos": False}
    assert torch.allclose(logits(load_out(out)), logits(dense), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--num-experts", "6", "--top-k", "2", "--granularity", "4"],
     "--num-experts (6) must be divisible by --granularity (4)"),
    (["--num-experts", "10", "--top-k", "5", "--granularity", "5"],
     "model.d_ff (48) of '{src}' is not divisible by --granularity (5)"),
    (["--num-experts", "8", "--top-k", "3", "--granularity", "2"],
     "--top-k (3) must be a multiple of --granularity (2)"),
    (["--num-experts", "4", "--top-k", "5"], "--top-k (5) must be <= --num-experts (4)"),
    (["--num-experts", "0", "--top-k", "1"], "--num-experts must be an integer >= 1, got 0"),
    (["--num-experts", "4", "--top-k", "2", "--router-std", "0"], "--router-std must be > 0, got 0.0"),
    (["--num-experts", "4", "--top-k", "2", "--moe-offset", "3"],
     "--moe-offset (3) must be < the n_layers (3) of '{src}'"),
    (["--num-experts", "4", "--top-k", "2", "--expert-noise", "-1"], "--expert-noise must be >= 0, got -1.0"),
])
def test_bad_arguments_exit_2_naming_the_value(dense_ckpt, tmp_path, capsys, args, message):
    _, src = dense_ckpt
    out = str(tmp_path / "moe")
    assert cli.main(["upcycle", src, out, "--quiet", *args]) == 2
    assert message.format(src=src) in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dense"]  # nothing written, no staging folder left


def test_bad_sources_and_outputs(dense_ckpt, tmp_path):
    dense, src = dense_ckpt
    moe_src = upcycle(src, str(tmp_path / "moe"), 4, 2, progress=False).out
    with pytest.raises(CheckpointError, match=re.escape(f"{moe_src!r} is already an MoE model (moe.num_experts 4 "
                                                        f"on layers [0, 1, 2]); upcycling needs a dense model")):
        upcycle(moe_src, str(tmp_path / "again"), 8, 2, progress=False)
    with pytest.raises(CheckpointError, match=re.escape(f"SRC {str(tmp_path / 'nope')!r} is not a directory")):
        upcycle(str(tmp_path / "nope"), str(tmp_path / "x"), 4, 2, progress=False)
    with pytest.raises(CheckpointError, match=re.escape(f"output {moe_src!r} already exists")):
        upcycle(src, moe_src, 4, 2, progress=False)
    bad = dense.state_dict()
    bad["blocks.1.ffn.w_out_FD"] = bad["blocks.1.ffn.w_out_FD"][:40]
    with pytest.raises(CheckpointError, match=re.escape("the dense state dict: blocks.1.ffn.w_out_FD has shape "
                                                        "(40, 32), its config implies (48, 32)")):
        upcycle_state(dense.cfg, bad, 4, 2)
    assert not os.path.exists(tmp_path / "again") and not os.path.exists(tmp_path / "x")
