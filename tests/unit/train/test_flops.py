"""Model FLOPs per token (moe_dist/train/flops.py, docs/training.md "MFU, FLOPs and memory")
equal a count by hand for a small model with every kind of layer; the device-name -> peak lookup
and the step log's MFU and peak memory."""

from __future__ import annotations

import pytest
import torch

from moe_dist.model.config import parse_model_config
from moe_dist.train import flops
from moe_dist.train.flops import (device_peak, mfu, model_flops_per_token, peak_memory_bytes, peak_tflops_of,
                                  step_log_suffix)

# Layer 0 dense, layer 1 MoE (4 experts, top 2, one shared expert with its gate), grouped-query
# attention (2 query heads, 1 key/value head of width 4), an untied LM head.
MODEL = dict(vocab_size=100, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=12,
             max_seq_len=16, moe_every=2, moe_offset=1, tie_embeddings=False)
MOE = dict(num_experts=4, top_k=2, d_ff=6, num_shared_experts=1, shared_d_ff=5, shared_gate=True)


def test_the_flop_count_equals_a_count_by_hand():
    count = model_flops_per_token(parse_model_config(MODEL, MOE), seq_len=10)
    # attention, per layer: q, k, v 2*8*(2+1+1)*4 = 256, output 2*(2*4)*8 = 128; two layers
    assert count.attention_proj == 2 * (256 + 128)
    # QK^T and AV: 4*H*d_h = 32 per key, (10 + 1) / 2 keys on average (causal), two layers
    assert count.attention_scores == 2 * (32 * 11 // 2)
    assert count.dense_ffn == 2 * 8 * 12 * 3  # SwiGLU: gate, up, down
    # router 2*8*4 + 2 routed experts of 2*8*6*3 + the shared expert 2*8*5*3 + its gate 2*8
    assert count.moe == 64 + 2 * 288 + 240 + 16
    assert count.lm_head == 2 * 8 * 100
    assert count.forward == 768 + 352 + 576 + 896 + 1600 == 4192
    assert count.train == 3 * 4192


def test_gelu_ffns_have_two_matrices_and_dense_models_no_moe_term():
    count = model_flops_per_token(parse_model_config({**MODEL, "activation": "gelu", "moe_every": 0}), seq_len=10)
    assert count.dense_ffn == 2 * (2 * 8 * 12 * 2) and count.moe == 0


def test_only_active_experts_count():
    few = model_flops_per_token(parse_model_config(MODEL, {**MOE, "num_experts": 4}), seq_len=10)
    many = model_flops_per_token(parse_model_config(MODEL, {**MOE, "num_experts": 64}), seq_len=10)
    assert many.moe - few.moe == 2 * 8 * 60  # only the router grows with the experts


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA B200", 2250.0), ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_device_names_map_to_their_datasheet_peaks(name, peak):
    assert peak_tflops_of(name) == peak


def test_a_gpu_run_gets_its_peak_and_the_step_log_shows_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = device_peak(torch.device("cuda", 0), None)
    assert (peak, source) == (989.0, "NVIDIA H100 80GB HBM3, dense BF16")
    # 8 devices at 989 TFLOP/s; 6e9 FLOPs per token at 1e5 tokens/s: 6e14 / 7.912e15
    utilization = mfu(6e9, 1e5, 8, peak)
    assert utilization == pytest.approx(6e14 / (8 * 989e12))
    assert step_log_suffix(utilization, 3 * 2**30) == " | MFU 7.6% | peak mem 3.00 GiB"
    assert device_peak(torch.device("cuda", 0), 400.0) == (400.0, "train.peak_tflops")


def test_cpu_has_no_mfu_but_shows_its_peak_rss(monkeypatch):
    peak, source = device_peak(torch.device("cpu"), None)
    assert peak is None and "no peak FLOP/s known for cpu" in source
    assert mfu(1e9, 1e5, 2, peak) is None
    memory, what = peak_memory_bytes(torch.device("cpu"))
    assert what == "peak RSS" and memory > 10 * 2**20  # this interpreter with torch loaded
    assert step_log_suffix(None, memory).startswith(" | peak mem ") and "MFU" not in step_log_suffix(None, memory)


def test_cuda_memory_is_the_allocators_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    assert peak_memory_bytes(torch.device("cuda", 0)) == (5.0 * 2**30, "CUDA max allocated")
    assert flops.PEAK_TFLOPS  # the table the docs list


def test_the_counted_matrix_multiplies_match_the_real_models():
    """torch's FlopCounterMode over a forward of the real model counts its `aten.mm`s: the
    projections, dense FFN, router, shared expert and gate, and LM head, which must equal the
    count without the routed experts and QK^T/AV (which run in kernels it does not count; their
    formula is the hand count above)."""
    from torch.utils.flop_counter import FlopCounterMode

    from moe_dist.model.transformer import MoETransformer
    from moe_dist.parallel.groups import ParallelGroups

    cfg = parse_model_config(MODEL, {**MOE, "dropless": True})
    model = MoETransformer(cfg, seed=1, groups=ParallelGroups(world_size=1, rank=0, ep_size=1))
    S = 10
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 100, (1, S)))
    count = model_flops_per_token(cfg, seq_len=S)
    routed = 2 * (2 * 8 * 6 * 3)
    assert counter.get_flop_counts()["Global"][torch.ops.aten.mm] == S * (
        count.forward - count.attention_scores - routed)


def test_the_gpu_kits_mfu_uses_the_trainers_count():
    """tools/bench/gpu_check.py's pretrain MFU divides by this count, so it and the step log agree."""
    from moe_dist.train.config import load_run_config
    from tools.bench.gpu_check_pretrain import ROOT, flops_per_token

    for config in ("configs/tiny_cpu.yaml", "configs/gpu_125m_e16_1gpu.yaml"):
        cfg = load_run_config(str(ROOT / config), [])
        assert flops_per_token(config, []) == model_flops_per_token(cfg.model, cfg.train.seq_len).train
