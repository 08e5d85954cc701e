"""Checkpoint tools carry the tensors of the new model features (q/k/v bias, q/k norms, grouped
key/value rows, the shared expert's gate and width): a real 2-rank training run (trainer API,
ZeRO-1, ep_size 2) with all of them is consolidated (module and fp32 master weights), loaded
back at ep_size 2 and 1, and resharded 2 -> 1 and resumed on the original loss curve. Export:
Mixtral expresses grouped-query attention and an explicit head_dim (transformers' own class gives
moe_dist's logits); the rest exports as the custom remote-code architecture, which gives them too;
COMET's expert-mask projections, which no state dict holds, are written by the export (the
model seed's, fp32) and load into the remote code."""

from __future__ import annotations

import os

import pytest
import torch
from tests.harness.ckpt import eval_logits, read_losses
from tests.harness.train import REPO, dump_json, run_deepspeed_ranks, tiny_config

from moe_dist.checkpoint import (ConsolidatedCheckpoint, TrainingCheckpoint, consolidate, export_hf,
                                 load_consolidated, reshard, save_consolidated)
from moe_dist.checkpoint.hf.exporter import mixtral_blockers
from moe_dist.checkpoint.training.layout import tag_for_step
from moe_dist.checkpoint.training.zero import read_zero_state
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel import runtime
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import parse_run_config
from moe_dist.train.preflight import preflight
from moe_dist.train.trainer import Trainer, pretrain

N, VOCAB, SEQ = 2, 257, 16
FEATURES = dict(n_heads=4, n_kv_heads=2, head_dim=6, qk_norm="head", qkv_bias=True)
NEW_TENSORS = ("blocks.0.attn.qkv.bias", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
               "blocks.1.moe.shared_gate.weight", "blocks.1.moe.shared.w_in_DI")
TIGHT = dict(rtol=1e-6, atol=1e-6)


def run_config(ep_size: int, checkpoint_dir: str, steps: int = 2 * N):
    return parse_run_config(tiny_config(
        model=dict(max_seq_len=SEQ, **FEATURES),
        moe=dict(ep_size=ep_size, eval_capacity_factor=0.0, dropless=True, num_shared_experts=1, shared_d_ff=24,
                 shared_gate=True, router={"type": "topk", "score": "sigmoid", "renormalize": True, "scale": 2.0}),
        train=dict(deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"), steps=steps,
                   seq_len=SEQ, micro_batch=2, grad_accum=1, checkpoint_interval=N, checkpoint_dir=checkpoint_dir)))


def _worker(rank: int, world: int, tmp: str) -> None:
    a = os.path.join(tmp, "a")
    cfg = run_config(2, a)
    trainer = Trainer(cfg, preflight(cfg, runtime.world_size(), cfg.train.deepspeed_config))
    result = trainer.run()
    logits = eval_logits(trainer.model)
    if rank == 0:
        torch.save(logits, os.path.join(tmp, "a_logits.pt"))
        dump_json(os.path.join(tmp, "a.json"), result.losses)
        consolidate(a, os.path.join(tmp, "a_consolidated"), progress=False)
        consolidate(a, os.path.join(tmp, "a_master"), master_weights=True, progress=False)
        reshard(a, os.path.join(tmp, "b_ckpt"), ep_size=1, tag=tag_for_step(N), progress=False)
    runtime.barrier()
    model = MoETransformer(cfg.model, seed=cfg.train.seed, groups=ParallelGroups.from_deepspeed(2, 4))
    load_consolidated(model, os.path.join(tmp, "a_consolidated"))
    logits = eval_logits(model)
    if rank == 0:
        torch.save(logits, os.path.join(tmp, "loaded_ep2_logits.pt"))
    resumed = pretrain(run_config(1, os.path.join(tmp, "b_ckpt")), resume=True)
    if rank == 0:
        dump_json(os.path.join(tmp, "b.json"), resumed.losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feature_runs")
    run_deepspeed_ranks(_worker, 2, str(tmp))
    return tmp


def test_consolidated_checkpoint_holds_the_new_tensors_and_gives_the_trained_logits(runs):
    ckpt = ConsolidatedCheckpoint.open(str(runs / "a_consolidated"))
    state = ckpt.state_dict()
    assert all(name in state for name in NEW_TENSORS)
    assert state["blocks.0.attn.qkv.weight"].shape == ((4 + 2 * 2) * 6, 32)
    assert state["blocks.0.attn.q_norm.weight"].shape == (6,)
    assert not torch.equal(state["blocks.0.attn.qkv.bias"], torch.zeros(48))  # trained away from its init
    model = MoETransformer(ckpt.model_cfg)
    load_consolidated(model, str(runs / "a_consolidated"))
    trained = torch.load(runs / "a_logits.pt")
    torch.testing.assert_close(eval_logits(model), trained, **TIGHT)
    assert torch.equal(torch.load(runs / "loaded_ep2_logits.pt"), trained)


def test_master_weights_carry_the_new_parameters(runs):
    master = ConsolidatedCheckpoint.open(str(runs / "a_master")).state_dict()
    module = ConsolidatedCheckpoint.open(str(runs / "a_consolidated")).state_dict()
    assert sorted(master) == sorted(module)
    assert all(torch.equal(master[n], module[n]) for n in master)  # fp32: master == module
    zero = read_zero_state(TrainingCheckpoint.open(str(runs / "a")), progress=False).master
    assert all(name in zero for name in NEW_TENSORS)


def test_resharded_checkpoint_resumes_on_the_same_loss_curve(runs):
    full, after = read_losses(runs / "a.json"), read_losses(runs / "b.json")
    assert sorted(after) == list(range(N + 1, 2 * N + 1))
    torch.testing.assert_close(torch.tensor([after[s] for s in sorted(after)]),
                               torch.tensor([full[s] for s in sorted(after)]), rtol=1e-5, atol=1e-6)


# ---- export-hf ---------------------------------------------------------------------------------

MODEL = dict(vocab_size=61, d_model=32, n_layers=2, d_ff=24, max_seq_len=12)
MIXTRAL_MOE = dict(num_experts=4, d_ff=16, top_k=2, eval_capacity_factor=0.0,
                   router={"type": "topk", "score_after_topk": True})


def test_mixtral_export_expresses_grouped_query_attention_and_head_dim(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = parse_model_config(dict(MODEL, n_heads=4, n_kv_heads=2, head_dim=12), MIXTRAL_MOE)
    model = MoETransformer(cfg, seed=2).eval()
    assert mixtral_blockers(cfg, model.state_dict()) == []
    save_consolidated(model, str(tmp_path / "c"))
    result = export_hf(str(tmp_path / "c"), str(tmp_path / "hf"), progress=False)
    assert result.architecture == "mixtral"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_key_value_heads == 2
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits_BSV, rtol=1e-5, atol=1e-5)


def test_export_of_features_no_native_class_computes_is_custom_and_gives_the_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = parse_model_config(dict(MODEL, n_heads=4, qk_norm="full", qkv_bias=True),
                             dict(MIXTRAL_MOE, num_shared_experts=1, shared_gate=True,
                                  router={"type": "topk", "score": "sigmoid", "scale": 2.0}))
    assert "model.qk_norm is 'full'; Mixtral has no q/k norm" in mixtral_blockers(cfg, {})
    model = MoETransformer(cfg, seed=4).eval()
    save_consolidated(model, str(tmp_path / "c"))
    assert export_hf(str(tmp_path / "c"), str(tmp_path / "hf"), progress=False).architecture == "custom"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens).logits_BSV, rtol=1e-5, atol=1e-5)


def test_export_of_comet_expert_masks_carries_the_projections_of_the_model_seed(tmp_path):
    """moe_dist keeps COMET's projections out of its state dict (drawn from the seed at build):
    the custom export writes each MoE layer's, of the checkpoint's seed, in fp32 even for a bf16
    export, and they load into the remote code as they are."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    cfg = parse_model_config(dict(MODEL, n_heads=4), dict(MIXTRAL_MOE, comet_active_fraction=0.5))
    assert "experts mask hidden units (moe.comet_active_fraction); Mixtral's do not" in mixtral_blockers(cfg, {})
    model = MoETransformer(cfg, seed=1234).eval()
    save_consolidated(model, str(tmp_path / "c"))
    assert export_hf(str(tmp_path / "c"), str(tmp_path / "hf"), dtype="bf16", progress=False).architecture == "custom"
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert weights["model.embed.weight"].dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    for i, moe in model.moe_layers():
        name = f"model.blocks.{i}.moe.experts.hidden_mask.v_EDF"
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], moe.experts.hidden_mask.v_eDF)
        assert torch.equal(hf.get_buffer(name), weights[name])  # fp32 beside bf16 weights
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # fp32 mask scores of bf16 activations (the logits at fp32: tests/unit/checkpoint/test_export_hf.py)
        assert torch.isfinite(hf(tokens).logits).all()
