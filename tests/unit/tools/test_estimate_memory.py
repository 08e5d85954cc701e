"""tools/estimate_memory.py: the per-rank estimate is within 15% of the measured peak tensor
memory of the real DeepSpeed engine on CPU (2 gloo ranks), for dense and MoE models, ZeRO-1 and
ZeRO-2, with and without recompute; and the parts of the estimate follow the layout rules.

Measured = bytes of every live tensor between steps (each storage once) + the peak of the
profiler's allocation events during one step (tools/estimate_memory.py, `measure_rank`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist.model.config import parse_model_config
from moe_dist.train.memory_plan import ZeroSettings, estimate, largest_micro_batch, parameter_counts
from tools import estimate_memory

ROOT = Path(__file__).resolve().parents[3]
TOOL = ROOT / "tools" / "estimate_memory.py"


def write_run(tmp_path: Path, name: str, stage: int, model: dict, moe: dict | None, micro_batch: int = 8) -> str:
    ds = tmp_path / f"{name}.json"
    # A small reduction bucket: DeepSpeed's default (5e8 elements) would be the whole estimate.
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage, "reduce_bucket_size": 200000},
                              "bf16": {"enabled": False}, "gradient_clipping": 1.0, "steps_per_print": 10**9}))
    cfg = {"model": dict(vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=64, **model),
           "train": {"deepspeed_config": str(ds), "steps": 10, "seq_len": 64, "micro_batch": micro_batch}}
    if moe is not None:
        cfg["moe"] = moe
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


MOE = dict(num_experts=8, ep_size=2, top_k=4, d_ff=128, capacity_factor=1.25)
CASES = {
    "dense-zero1": (1, dict(d_ff=256, moe_every=0), None),
    "moe-zero2": (2, dict(d_ff=128, moe_every=1), MOE),
    "moe-zero1-experts-recompute-ckpt": (1, dict(d_ff=128, moe_every=1, moe_recompute="experts",
                                                 activation_checkpointing=True), MOE),
    "moe-zero2-activation-recompute": (2, dict(d_ff=128, moe_every=1, moe_recompute="activation"), MOE),
    # DeepSeek-V3's layout: latent attention (wide heads from a narrow latent), a dense first layer.
    "mla-moe-zero1-dense-first": (1, dict(d_ff=256, moe_offset=1, attention="mla", q_lora_rank=32, kv_lora_rank=32,
                                          qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32),
                                  dict(MOE, num_shared_experts=1)),
    # DeepSeek-V3's layout: an MTP block (MoE, layer n_layers) and group-limited routing.
    "moe-zero1-mtp": (1, dict(d_ff=128, moe_every=1, mtp_layers=1),
                      dict(MOE, router={"type": "topk", "expert_groups": 4, "topk_groups": 2})),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_within_15_percent_of_measured(tmp_path, name):
    stage, model, moe = CASES[name]
    row = estimate_memory.compare(write_run(tmp_path, name, stage, model, moe), world=2)
    print(f"{name}: estimate {row['estimate_mib']:.2f} MiB, measured {row['measured_mib']:.2f} MiB "
          f"(rank {row['measured_rank']}), ratio {row['estimate_over_measured']:.3f}")
    assert 0.85 <= row["estimate_over_measured"] <= 1.15, row


def small_model(**model):
    return parse_model_config(dict(dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                        max_seq_len=16, moe_every=1), **model),
                              dict(num_experts=8, ep_size=4, top_k=2, d_ff=32))


def test_parameter_counts_match_the_built_model():
    from moe_dist.model.transformer import MoETransformer

    cfg = parse_model_config(dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16),
                             dict(num_experts=8, ep_size=1, top_k=2, d_ff=32, num_shared_experts=1))
    model = MoETransformer(cfg)
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    assert parameter_counts(cfg) == (sum(p.numel() for p in model.parameters()) - expert, expert)


def test_latent_attention_is_counted_in_parameters_and_the_kv_cache():
    from moe_dist.train.memory_plan import kv_cache_bytes_per_token

    mla = parse_model_config(dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, attention="mla",
                                  q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6,
                                  v_head_dim=5))
    H, D = 4, 32
    attention = D * 12 + 12 + 12 * H * 10 + D * (8 + 4) + 8 + 8 * H * (6 + 5) + H * 5 * D
    ffn_and_norms = 3 * D * 64 + 2 * D
    assert parameter_counts(mla) == (100 * D + 2 * (attention + ffn_and_norms) + D, 0)
    assert kv_cache_bytes_per_token(mla, "bf16") == 2 * (8 + 4) * 2  # the latent and rotary key, per layer
    mha = parse_model_config(dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
    assert kv_cache_bytes_per_token(mha, "bf16") == 2 * (2 * 2 * 8) * 2


def test_zero_partitions_optimizer_state_and_zero2_gradients_over_the_world():
    cfg = small_model()
    dense, expert = parameter_counts(cfg)
    kw = dict(world_size=8, micro_batch=1, seq_len=16)
    z0 = estimate(cfg, ZeroSettings(stage=0), **kw)
    z1 = estimate(cfg, ZeroSettings(stage=1, contiguous_gradients=False), **kw)
    z2 = estimate(cfg, ZeroSettings(stage=2, contiguous_gradients=False), **kw)
    local = dense + expert // 4  # ep 4: a quarter of the experts on each rank
    assert z0.weights == z1.weights == local * 4
    assert z0.optimizer == local * 12
    # Dense state over the 8 DP ranks, expert state over the 2 EDP replicas of each expert.
    assert z1.optimizer == int((dense / 8 + (expert // 4) / 2) * 12)
    assert z1.gradients == local * 4 + (dense / 8 + (expert // 4) / 2) * 4
    assert z2.gradients == (dense / 8 + (expert // 4) / 2) * 8
    bf16 = estimate(cfg, ZeroSettings(stage=2, dtype="bf16", contiguous_gradients=False), **kw)
    assert bf16.weights == local * 2 and bf16.optimizer == z2.optimizer


def test_recompute_modes_order_and_largest_micro_batch():
    plan = estimate(small_model(), ZeroSettings(stage=1), world_size=4, micro_batch=2, seq_len=16)
    acts = plan.activations
    assert acts["ckpt=off,moe_recompute=none"] > acts["ckpt=off,moe_recompute=activation"] \
        > acts["ckpt=off,moe_recompute=experts"] > acts["ckpt=on,moe_recompute=experts"]
    mode = "ckpt=off,moe_recompute=none"
    per_seq = acts[mode] / 2
    fits = largest_micro_batch(plan, plan.static + 5.5 * per_seq, mode)
    assert fits == 5
    assert largest_micro_batch(plan, plan.static / 2, mode) == 0


def test_the_receive_budget_sizes_the_experts_rows():
    """Under `moe.rank_capacity_factor` the plan counts the rows a rank can receive at most,
    P * ceil(cf * T * K / P) (T 32 tokens, K 2, P 4), capped by the slots a capacity leaves."""
    moe = dict(num_experts=8, ep_size=4, top_k=2, d_ff=32, dropless=True)
    model = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe_every=1)

    def plan(**extra):
        return estimate(parse_model_config(model, {**moe, **extra}), ZeroSettings(stage=1), world_size=4,
                        micro_batch=2, seq_len=16)

    unbounded, half, double = plan(), plan(rank_capacity_factor=0.5), plan(rank_capacity_factor=2.0)
    assert unbounded.receive_rows is None
    assert (half.receive_rows, double.receive_rows) == (4 * 8, 4 * 32)
    mode = "ckpt=off,moe_recompute=none"
    assert half.activations[mode] < unbounded.activations[mode] < double.activations[mode]
    # Capacity 1.0 leaves 2 experts x 8 slots = 16 rows per source rank: the budget's 32 cannot bind.
    capped = plan(dropless=False, capacity_factor=1.0, rank_capacity_factor=2.0)
    assert capped.receive_rows == 4 * 16
    text = estimate_memory.format_report(estimate_memory.report(half, None, mode))
    assert "receive budget: at most 32 rows per MoE layer" in text


def test_cli_report_and_bad_config_exit_2(tmp_path):
    path = write_run(tmp_path, "cli", 2, dict(d_ff=128, moe_every=1), MOE)
    proc = subprocess.run([sys.executable, str(TOOL), path, "--world-size", "4", "--gpu-memory", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["zero_stage"] == 2 and rep["ep_size"] == 2 and len(rep["modes"]) == 6
    assert rep["cuda_context_gib"] == 1.0 and rep["nccl_buffers_gib"] > 0 and rep["fragmentation_margin"] == 0.1
    assert all(row["largest_micro_batch"] > 0 for row in rep["modes"].values())
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {vocab_size: 10, d_model: 8, n_layers: 1, n_heads: 2, d_ff: 8, moe_recompute: all}\n"
                   "train: {deepspeed_config: x.json, steps: 1, seq_len: 4, micro_batch: 1}\n")
    proc = subprocess.run([sys.executable, str(TOOL), str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "moe_recompute" in proc.stderr and "bad.yaml" in proc.stderr, proc.stderr


def _unrecorded_free_bytes(rank: int, init: str, settle: bool, results: str) -> None:
    """A rank of the test below: 40 all-to-alls whose tensors are dropped as soon as they return,
    under the memory profiler; writes the bytes allocated and never seen freed."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        if settle:
            estimate_memory.settle_collectives()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(40):
                out = torch.empty(2, 65536)
                dist.all_to_all_single(out, torch.ones(2, 65536))
                del out
        held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        Path(f"{results}.{rank}").write_text(str(held))
    finally:
        dist.destroy_process_group()


def test_settled_collectives_let_the_profiler_see_every_free(tmp_path):
    """Without `settle_collectives` gloo's worker thread sometimes drops the last reference to a
    collective's tensor, the free is not recorded, and the measured peak grows by run-to-run
    chance (6-20 of every 40 calls here, on each rank). Settled, a rare one still slips through
    (about one rank in ten sees one of its 40), which this bound allows."""
    import torch.multiprocessing as mp

    mp.spawn(_unrecorded_free_bytes, args=(str(tmp_path / "rv"), True, str(tmp_path / "held")), nprocs=2)
    held = [int((tmp_path / f"held.{r}").read_text()) for r in range(2)]
    assert sum(held) <= 2 * 65536 * 4, held  # at most one of the 80 transfers' tensors


def test_the_gpu_terms_each_by_its_formula():
    """What item 11 of issue 21 found missing, each its own term: the fp32 copies of the reduction
    buckets (bf16 with fp32 communication), the routers' fp32 input copies, and on a GPU the CUDA context, NCCL's buffers and the fragmentation margin."""
    from moe_dist.train import memory_plan as mp

    cfg = small_model()  # 2 layers, both MoE, d 32, vocab 100; ep 4
    T = 2 * 16
    kw = dict(world_size=8, micro_batch=2, seq_len=16)
    fp32 = estimate(cfg, ZeroSettings(stage=2, overlap_comm=True, reduce_bucket_size=1000), **kw)
    assert (fp32.grad_comm_copy, fp32.router_fp32_input, fp32.cuda_context, fp32.nccl_buffers,
            fp32.fragmentation_margin) == (0, 0, 0, 0, 0.0)
    mode = "ckpt=off,moe_recompute=none"
    assert fp32.total(mode) == fp32.static + fp32.activations[mode]  # what the CPU measurement checks

    bf16 = ZeroSettings(stage=2, dtype="bf16", overlap_comm=True, reduce_bucket_size=1000)
    plan = estimate(cfg, bf16, gpu_runtime=True, **kw)
    assert plan.grad_comm_copy == 1000 * 4 * 2  # two buckets in flight with overlap_comm
    assert plan.router_fp32_input == 2 * T * 32 * 4  # both layers are MoE layers
    assert plan.cuda_context == mp.CUDA_CONTEXT_BYTES == 2**30
    # WORLD and DeepSpeed's data-parallel copy (8 ranks), the EDP group (2): rings of 16 channels x
    # 2 neighbours; the EP all-to-all: 3 peers x 2 channels. 4 MiB each.
    assert plan.nccl_buffers == 4 * 2**20 * (3 * 16 * 2 + 3 * 2)
    allocated = plan.static + plan.grad_comm_copy + plan.activations[mode] + plan.router_fp32_input
    assert plan.allocated(mode) == allocated
    assert plan.total(mode) == allocated + int(allocated * 0.10) + plan.cuda_context + plan.nccl_buffers

    # No bucket copies when the JSON asks for bf16 communication; nothing of the GPU runtime on one
    # rank's NCCL.
    assert estimate(cfg, ZeroSettings(stage=2, dtype="bf16", comm_dtype="bf16"), **kw).grad_comm_copy == 0
    assert mp.nccl_buffer_bytes(1, 1) == 0 and mp.nccl_buffer_bytes(8, 8) == 4 * 2**20 * (2 * 16 * 2 + 7 * 2)


def test_largest_micro_batch_counts_every_term():
    cfg = small_model()
    zero = ZeroSettings(stage=2, dtype="bf16", overlap_comm=True, reduce_bucket_size=1000)
    kw = dict(world_size=8, seq_len=16, gpu_runtime=True)
    mode = "ckpt=off,moe_recompute=none"
    budget = estimate(cfg, zero, micro_batch=7, **kw).total(mode) + 10
    fits = largest_micro_batch(estimate(cfg, zero, micro_batch=2, **kw), budget, mode)
    assert fits == 7
    assert estimate(cfg, zero, micro_batch=fits + 1, **kw).total(mode) > budget


def test_bf16_json_is_planned_with_the_fp32_gradient_communication_it_gets():
    ds = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    assert ZeroSettings.from_deepspeed(ds).comm_dtype == "fp32"
    assert ZeroSettings.from_deepspeed({**ds, "communication_data_type": "bf16"}).comm_dtype == "bf16"


def test_the_report_prints_each_term_on_its_own_line():
    proc = subprocess.run([sys.executable, str(TOOL), str(ROOT / "configs" / "gpu_1b_active_e64.yaml"),
                           "--world-size", "8", "--gpu-memory", "80"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for line in ("  fp32 copies of the gradient reduction buckets (fp32 communication of bf16): 0.373 GiB",
                 "  routers' fp32 copies of their bf16 input (one micro batch): 2.000 GiB",
                 "  CUDA context and cuBLAS workspaces (an allowance): 1.000 GiB",
                 "  NCCL buffers (NCCL_BUFFSIZE x channels x peers, every communicator): 0.305 GiB",
                 "  fragmentation margin: 10% of the allocated total"):
        assert line in proc.stdout.splitlines(), proc.stdout
    # The shipped config's checkpointing mode on 8 GPUs: 63.5 GiB before these terms.
    (row,) = [line for line in proc.stdout.splitlines() if "(config)" in line]
    assert row == "| ckpt=on,moe_recompute=none (config) | 46.793 | 6.583 | 73.718 | 4 |"
