"""Per-rank memory of a training run before it is launched: weights, gradients and optimizer state
under the DeepSpeed JSON's ZeRO stage and the expert-parallel layout, plus the activations of one
micro batch under each checkpointing mode, and the largest micro batch that fits a budget.

Legend: moe_dist/moe/__init__.py (T tokens of a micro batch, D, F, E, K, V). Byte counts, not
MiB; `tools/estimate_memory.py` is the command line.

What is counted, per rank (W data-parallel ranks, P = moe.ep_size, W / P expert-data-parallel
replicas), as DeepSpeed 0.19.8's ZeRO-1/2 optimizer (`stage_1_and_2.py`) allocates it:
- weights: the dense parameters (replicated) and E / P experts' parameters, in the run's dtype;
- master weights and Adam's two moments: fp32, this rank's partition only. The dense group is
  partitioned over the W DP ranks, each expert group over its W / P EDP ranks, so both come to
  1 / W of the model's parameters. DeepSpeed clones the master copy even in fp32;
- gradients: ZeRO-1 every local parameter's gradient in the run's dtype, ZeRO-2 only this rank's
  partition; plus the reduction buckets (`contiguous_gradients`: `reduce_bucket_size` elements,
  two of them with `overlap_comm`) and the fp32 gradient partition the optimizer step reads;
- activations: what autograd keeps at the start of the backward, per token and layer, counted
  from the ops the model runs (below), plus the output logits and their log-softmax.
The numbers are compared with measured peak tensor memory of small CPU runs of the real engine in
tests/unit/tools/test_estimate_memory.py (BENCHMARKS.md, "Memory estimate vs measured").

What a GPU run adds, each its own line of the plan (`MemoryPlan`; totals include them):
- the fp32 copy of each gradient reduction bucket: under bf16 with fp32 gradient communication
  (moe_dist/train/ds_config.py) ZeRO-2 stages gradients in bf16 buckets and casts a bucket to
  fp32 for its reduce-scatter (`gradient_reduction_w_predivide`), one bucket at a time, two with
  `overlap_comm`;
- the router's fp32 copy of its bf16 input: every router computes its logits in fp32
  (`F.linear(x.float(), ...)`), and autograd keeps that copy (T x D x 4 bytes per MoE layer) for
  the router weight's gradient. None in fp32 training, where `.float()` is the tensor itself;
- `gpu_runtime` only (`tools/estimate_memory.py --device cuda`), memory the caching allocator
  does not hand out: the CUDA context per process (`CUDA_CONTEXT_BYTES`) and NCCL's
  communication buffers (`nccl_buffer_bytes`), and fragmentation, a stated margin
  (`FRAGMENTATION_MARGIN`) on what the allocator does hand out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig
from moe_dist.moe.rank_budget import rank_budget
from moe_dist.moe.recompute import RECOMPUTE_MODES
from moe_dist.train.ds_config import gradient_dtypes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default `reduce_bucket_size` (elements)
MiB, GiB = 2**20, 2**30

# The CUDA context of one process: the driver's per-context state and the kernel images it loads,
# which nvidia-smi shows before any tensor exists (781 MB for a bare `import torch; x.cuda()` in
# pytorch/pytorch#34323; CUDA's lazy module loading, the default since CUDA 11.7, lowers it), plus
# cuBLAS's per-handle workspaces (CUBLAS_WORKSPACE_CONFIG default ":4096:8", 32 MiB) and
# cuBLASLt's. Rounded up to 1 GiB: an allowance, not a measurement (no GPU measured it here).
CUDA_CONTEXT_BYTES = 1 * GiB
# NCCL's buffers (docs.nvidia.com/deeplearning/nccl, "Environment Variables"): NCCL_BUFFSIZE per
# channel and connection (default 4 MiB). A ring/tree communicator connects each rank to its two
# ring neighbours on each of its channels; NCCL picks the channel count from the topology, up to
# NCCL_MAX_NCHANNELS (16 assumed here, what NVLink nodes of 8 GPUs get; NCCL_MAX_NCHANNELS bounds
# it). An all-to-all connects each rank to every other rank of its group over
# NCCL_NCHANNELS_PER_NET_PEER channels (default 2).
NCCL_BUFFSIZE = 4 * MiB
NCCL_RING_CHANNELS = 16
NCCL_RING_PEERS = 2
NCCL_P2P_CHANNELS_PER_PEER = 2
# Fragmentation: the caching allocator reserves more than it hands out (blocks split and cached
# per size class and per stream). A stated margin on the allocated total, not a measured one;
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it.
FRAGMENTATION_MARGIN = 0.10


@dataclass
class ZeroSettings:
    """What of the DeepSpeed JSON decides memory."""

    stage: int = 0
    dtype: str = "fp32"
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    reduce_bucket_size: int = DEEPSPEED_REDUCE_BUCKET
    comm_dtype: str = "fp32"  # gradient communication (ds_config.gradient_dtypes)

    @classmethod
    def from_deepspeed(cls, ds: dict[str, Any]) -> ZeroSettings:
        zero = ds.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0))
        if stage not in (0, 1, 2):
            raise ConfigError(f"zero_optimization.stage {stage}: DeepSpeed's MoE supports ZeRO 0-2 only")
        dtype = "fp32"
        for name in ("bf16", "fp16"):
            if (ds.get(name) or {}).get("enabled", False):
                dtype = name
        return cls(stage=stage, dtype=dtype,
                   contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                   overlap_comm=bool(zero.get("overlap_comm", False)),
                   reduce_bucket_size=int(float(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET))),
                   comm_dtype=gradient_dtypes(ds)[0])


@dataclass
class MemoryPlan:
    """Bytes per rank. `activations[mode]` is one micro batch of `micro_batch` sequences."""

    world_size: int
    ep_size: int
    micro_batch: int
    seq_len: int
    zero: ZeroSettings
    dense_params: int  # replicated on every rank
    expert_params: int  # this rank's experts (all experts / ep_size)
    weights: int
    gradients: int
    optimizer: int
    activations: dict[str, int] = field(default_factory=dict)
    grad_comm_copy: int = 0  # fp32 copies of the reduction buckets in flight (bf16, fp32 communication)
    router_fp32_input: int = 0  # one micro batch, every MoE layer
    cuda_context: int = 0
    nccl_buffers: int = 0
    fragmentation_margin: float = 0.0
    kv_cache_per_token: int = 0  # generation's KV cache per token of a sequence (not a training term)
    # Rows one MoE layer's experts may receive per rank under the receive budget (None: no budget).
    receive_rows: int | None = None

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def runtime(self) -> int:
        """What the caching allocator does not hand out: CUDA context and NCCL buffers."""
        return self.cuda_context + self.nccl_buffers

    def allocated(self, mode: str) -> int:
        """Tensor memory at the peak: what the caching allocator hands out."""
        return self.static + self.grad_comm_copy + self.activations[mode] + self.router_fp32_input

    def fragmentation(self, mode: str) -> int:
        return int(self.allocated(mode) * self.fragmentation_margin)

    def total(self, mode: str) -> int:
        return self.allocated(mode) + self.fragmentation(mode) + self.runtime


def parameter_counts(model: ModelConfig) -> tuple[int, int]:
    """(dense parameters, expert parameters of all experts), read off the real model built on the
    meta device (no memory, any size), so every architecture option is counted as built."""
    from moe_dist.model.transformer import MoETransformer

    cfg = model if model.moe is None else replace(model, moe=replace(model.moe, ep_size=1))
    with torch.device("meta"):
        built = MoETransformer(cfg)
    dense = expert = 0
    for p in built.parameters():
        if getattr(p, "allreduce", True) is False:
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert


def mode_names(model: ModelConfig) -> list[str]:
    """The checkpointing modes reported: `activation_checkpointing` off/on x `moe_recompute`."""
    modes = []
    for ckpt in (False, True):
        for rec in RECOMPUTE_MODES if model.moe is not None else ("none",):
            modes.append(f"ckpt={'on' if ckpt else 'off'},moe_recompute={rec}")
    return modes


def mode_of(model: ModelConfig) -> str:
    return f"ckpt={'on' if model.activation_checkpointing else 'off'},moe_recompute={model.moe_recompute}"


def _capacity_rows(model: ModelConfig, tokens: int) -> float:
    """Routed rows an MoE layer keeps per rank (at most T * K; capacity caps it at E * C). With a
    receive budget (`moe.rank_capacity_factor`) the rows a rank receives instead: `receive_rows`."""
    moe = model.moe
    bounded = receive_rows(model, tokens)
    if bounded is not None:
        return float(bounded)
    rows = tokens * moe.top_k
    if not moe.dropless and moe.capacity_factor > 0:
        cap = max(math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts), moe.min_capacity)
        rows = min(rows, cap * moe.num_experts)
    return float(rows)


def receive_rows(model: ModelConfig, tokens: int) -> int | None:
    """The most rows an MoE layer's experts can receive on one rank under the receive budget,
    whatever the routing: P source ranks send at most B = ceil(cf * T * K / P) rows each
    (moe/rank_budget.py), and no more than their capacity slots (e * C) or pairs (T * min(K, e))
    for this rank's e experts. None without a budget: then the receive buffer follows the routing
    (up to P * T * K rows when every rank routes to one), and the plan counts the balanced T * K."""
    moe = model.moe
    budget = None if moe is None else rank_budget(tokens, moe.top_k, moe.ep_size, moe.rank_capacity_factor)
    if budget is None:
        return None
    e = moe.num_local_experts
    per_source = min(budget, tokens * min(moe.top_k, e))
    if not moe.dropless and moe.capacity_factor > 0:
        cap = max(math.ceil(moe.capacity_factor * tokens * moe.top_k / moe.num_experts), moe.min_capacity)
        per_source = min(per_source, e * min(cap, tokens))
    return moe.ep_size * per_source


def activation_bytes(model: ModelConfig, tokens: int, dtype: str, *, checkpointing: bool,
                     recompute: str, gpu_experts: bool = False) -> int:
    """What the backward of one micro batch of `tokens` tokens needs kept, at its start.

    Per token, in elements of the run's dtype b (fp32 norm internals in 4 bytes):
    - attention: the norm's fp32 input and normalized rows and its output (8 bytes + b per D),
      qkv (3D), rotated q and k (2D), the attention output and its reshaped copy
      (2D); under `activation_checkpointing` only the block input (D), with one block's worth
      live again while it is recomputed;
    - dense FFN: norm (3D), the fused gate/up output (2F), silu(gate) (F), the activation (F);
    - MoE FFN: norm (3D); router logits, probabilities and their fp32 loss terms (~4E, fp32);
      per kept routed row (R = T*K, or the capacity's E*C, or under a receive budget the most rows
      the rank can receive, `receive_rows`): the expert output (D) the combine
      keeps, index and weight bookkeeping (3 int64 + 1 fp32), and 4F (none), 2F (activation) or
      0 (experts) of expert activations; the portable GEMM backend (GPUs) also keeps the
      gathered input rows (D), which the CPU backend regathers;
      the expert activations a recompute mode drops (2F or 4F per row, and the shared expert's
      4F per token under `experts`) are rebuilt in the backward one layer at a time, so the
      largest of them is counted once, like one checkpointed block;
    - output: logits and their log-softmax (2V in fp32, plus the bf16 logits);
    - multi-token prediction (`model.mtp_layers`): its block is layer n_layers, counted as the
      layers above (at T tokens, a bound on its T (S-1)/S), plus its enorm, hnorm and head_norm
      (fp32 internals), the concatenated input (2D) and eh_proj's output (D), and its own logits
      and log-softmax.
    """
    b = DTYPE_BYTES[dtype]
    D, V = model.d_model, model.vocab_size
    fp32_norm = (8 + b) * D  # the fp32 input and normalized rows, the output in the run's dtype
    attn = fp32_norm + (latent_attention_bytes(model, b) if model.attention == "mla" else 7 * D * b)
    dense_ffn = fp32_norm + 4 * model.d_ff * b
    per_layer, largest_block = 0.0, 0.0
    for i in range(model.n_layers + model.mtp_layers):  # the MTP block is layer n_layers
        attn_kept = D * b if checkpointing else attn
        if model.is_moe_layer(i):
            moe = model.moe
            rows = _capacity_rows(model, tokens) / tokens
            per_row = D * b + 3 * 8 + 4 + (D * b if gpu_experts else 0)
            kept_ff = {"none": 4, "activation": 2, "experts": 0}[recompute]
            per_row += kept_ff * moe.d_ff * b
            ffn = fp32_norm + 4 * moe.num_experts * 4 + rows * per_row
            # What the experts' backward rebuilds lives again while that one layer is differentiated.
            rebuilt = rows * (4 - kept_ff) * moe.d_ff * b
            if moe.num_shared_experts:
                shared_ff = 4 * moe.d_ff * moe.num_shared_experts * b
                ffn += 0 if recompute == "experts" else shared_ff
                rebuilt += shared_ff if recompute == "experts" else 0
            per_layer += attn_kept + ffn
            largest_block = max(largest_block, attn if checkpointing else 0, rebuilt)
        else:
            per_layer += attn_kept + (D * b if checkpointing else dense_ffn)
            largest_block = max(largest_block, (attn + dense_ffn) if checkpointing else 0)
    logits = 2 * V * 4 + (V * b if b != 4 else 0)
    mtp = model.mtp_layers * (3 * fp32_norm + 3 * D * b + logits)
    return int(tokens * (per_layer + largest_block + logits + D * b + mtp))


def latent_attention_bytes(model: ModelConfig, b: int) -> int:
    """Per token, what latent attention (`model.attention: mla`) keeps for its backward besides
    the block's norm: the query's down-projection, its norm (fp32 internals) and up-projection
    (l, l, H(n+r); or the full-rank H(n+r)), the rotated rotary part and the re-joined query
    (Hr, H(n+r)); the latent and rotary key (c + r), the latent's norm (fp32 internals, c), the
    rotated key (r); the expanded key-nope/value (H(n+o)), the joined keys (H(n+r)) and the values
    the attention reads (Ho); the attention output and its reshaped copy (2Ho)."""
    H, n, r, o, c = model.n_heads, model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim, model.kv_lora_rank
    low_rank = model.q_lora_rank or 0
    q = 2 * low_rank + 2 * H * (n + r) + H * r
    kv = (c + r) + c + r + H * (n + o) + H * (n + r) + 3 * H * o
    return (q + kv) * b + 8 * (low_rank + c)


def kv_cache_bytes_per_token(model: ModelConfig, dtype: str) -> int:
    """What generation's KV cache (moe_dist/model/generation.py) holds per token of every
    sequence: every layer's keys and values (2 Y A), or latent attention's latent and rotary key
    (c + r, whatever the number of heads)."""
    per_layer = (model.kv_lora_rank + model.qk_rope_head_dim if model.attention == "mla"
                 else 2 * model.n_kv_heads * model.head_dim)
    return model.n_layers * per_layer * DTYPE_BYTES[dtype]


def router_fp32_input_bytes(model: ModelConfig, tokens: int, dtype: str) -> int:
    """The fp32 copies of the routers' inputs autograd keeps (none when the run is fp32)."""
    if model.moe is None or dtype == "fp32":
        return 0
    mtp_moe = int(bool(model.mtp_layers) and model.is_moe_layer(model.n_layers))  # the MTP block's
    return (len(model.moe_layer_indices) + mtp_moe) * tokens * model.d_model * 4


def nccl_buffer_bytes(world_size: int, ep_size: int) -> int:
    """NCCL's buffers on one rank, for the communicators a run opens: WORLD and DeepSpeed's
    data-parallel copy of it, the expert-data-parallel group (ring/tree collectives), and the
    expert-parallel group (the all-to-all). A group of one rank opens no connection."""
    ring = NCCL_BUFFSIZE * NCCL_RING_CHANNELS * NCCL_RING_PEERS
    rings = sum(ring for size in (world_size, world_size, world_size // ep_size) if size > 1)
    return rings + NCCL_BUFFSIZE * NCCL_P2P_CHANNELS_PER_PEER * (ep_size - 1)


def estimate(model: ModelConfig, zero: ZeroSettings, *, world_size: int, micro_batch: int, seq_len: int,
             gpu_experts: bool = False, gpu_runtime: bool = False) -> MemoryPlan:
    """The per-rank plan of `model` under `zero` on `world_size` ranks. `gpu_runtime`: add the CUDA
    context, NCCL's buffers and the fragmentation margin (a GPU run)."""
    ep = model.moe.ep_size if model.moe is not None else 1
    if world_size % ep:
        raise ConfigError(f"world size ({world_size}) must be a multiple of moe.ep_size ({ep})")
    dense, expert_all = parameter_counts(model)
    expert = expert_all // ep
    b = DTYPE_BYTES[zero.dtype]
    local = dense + expert
    weights = local * b
    partition = local if zero.stage == 0 else dense / world_size + expert / (world_size // ep)
    optimizer = int(partition * 12)  # fp32 master copy + Adam's exp_avg and exp_avg_sq
    grads = local * b if zero.stage < 2 else partition * b
    if zero.stage >= 1:
        grads += partition * 4  # the fp32 gradient partition the optimizer step reads
        if zero.contiguous_gradients:
            grads += zero.reduce_bucket_size * b * (2 if zero.overlap_comm else 1)
    tokens = micro_batch * seq_len
    acts = {}
    for name in mode_names(model):
        ckpt = name.startswith("ckpt=on")
        rec = name.rsplit("=", 1)[1]
        acts[name] = activation_bytes(model, tokens, zero.dtype, checkpointing=ckpt, recompute=rec,
                                      gpu_experts=gpu_experts)
    grad_comm_copy = 0
    if zero.stage >= 1 and zero.comm_dtype == "fp32" and b != 4:
        grad_comm_copy = zero.reduce_bucket_size * 4 * (2 if zero.overlap_comm else 1)
    return MemoryPlan(world_size=world_size, ep_size=ep, micro_batch=micro_batch, seq_len=seq_len, zero=zero,
                      dense_params=dense, expert_params=expert, weights=int(weights), gradients=int(grads),
                      optimizer=optimizer, activations=acts, grad_comm_copy=grad_comm_copy,
                      router_fp32_input=router_fp32_input_bytes(model, tokens, zero.dtype),
                      cuda_context=CUDA_CONTEXT_BYTES if gpu_runtime else 0,
                      nccl_buffers=nccl_buffer_bytes(world_size, ep) if gpu_runtime else 0,
                      fragmentation_margin=FRAGMENTATION_MARGIN if gpu_runtime else 0.0,
                      kv_cache_per_token=kv_cache_bytes_per_token(model, zero.dtype),
                      receive_rows=receive_rows(model, tokens))


def largest_micro_batch(plan: MemoryPlan, budget_bytes: float, mode: str) -> int:
    """The largest micro batch whose total fits `budget_bytes` under `mode` (0: not even one)."""
    per_sequence = (plan.activations[mode] + plan.router_fp32_input) / plan.micro_batch
    allocatable = (budget_bytes - plan.runtime) / (1 + plan.fragmentation_margin)
    room = allocatable - plan.static - plan.grad_comm_copy
    return max(0, int(room // per_sequence)) if per_sequence > 0 else 0
