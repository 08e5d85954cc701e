"""Model FLOPs per token, MFU and peak memory for the step log (docs/training.md, "MFU, FLOPs and
memory", has the formula with a worked example).

Counted: every matrix multiply of the forward pass, 2 FLOPs per multiply-add, for one token of a
sequence of `seq_len` tokens, with only the experts a token is routed to (active parameters):

    attention, per layer    2 D (H + 2 Hkv) d_h   (q, k, v)  +  2 H d_h D   (output)
                            + 2 H d_h (S + 1)     (QK^T and AV: 2 x 2 H d_h per key, and a token
                                                   at position i attends i + 1 keys, (S + 1) / 2
                                                   on average: causal)
    dense FFN layer         2 D F x 3 (SwiGLU: gate, up, down; GELU: x 2)
    MoE layer               2 D E (router logits) + K x expert FFN (width moe.d_ff)
                            + the shared experts' FFN (width moe.shared_d_ff) + 2 D (shared gate)
    LM head                 2 D V

Not counted: embeddings (a lookup), norms, softmax, rotary, activations and other elementwise
work, research routers' extra projections, COMET's neuron mask. Training = 3 x forward (the
backward pass costs twice the forward), so 6 x the active matmul parameters per token plus the
attention term. Activation recompute (model.activation_checkpointing, model.moe_recompute) is not
counted: MFU counts the model's FLOPs, not the hardware's (PaLM's MFU vs HFU), so recompute lowers
MFU.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

from moe_dist.model.config import ModelConfig

# Dense BF16 tensor-core peaks (without structured sparsity) per GPU, in TFLOP/s, from the
# vendors' datasheets: NVIDIA A100 Tensor Core GPU (312 SXM and PCIe), H100 Tensor Core GPU
# (SXM 989, NVL 835, PCIe 756; the datasheet's with-sparsity figures halved), H200 Tensor Core
# GPU (SXM 989, NVL 835), HGX B200 (2,250 per GPU: 4.5 PFLOPS with sparsity, halved). Matched in
# order against torch.cuda.get_device_name(): the first row whose every word is in the name.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),
    (("H200", "NVL"), 835.0),
    (("H200",), 989.0),
    (("A100",), 312.0),
    (("B200",), 2250.0),
)


def ffn_flops(d_model: int, d_ff: int, activation: str) -> int:
    return 2 * d_model * d_ff * (3 if activation == "swiglu" else 2)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, by part (their sum: `forward`)."""

    attention_proj: int
    attention_scores: int
    dense_ffn: int
    moe: int
    lm_head: int

    @property
    def forward(self) -> int:
        return self.attention_proj + self.attention_scores + self.dense_ffn + self.moe + self.lm_head

    @property
    def train(self) -> int:
        """Forward and backward (3 x forward); recompute not counted."""
        return 3 * self.forward


def model_flops_per_token(model: ModelConfig, seq_len: int) -> FlopCount:
    D, H, Hkv, dh = model.d_model, model.n_heads, model.n_kv_heads, model.head_dim
    proj = 2 * D * (H + 2 * Hkv) * dh + 2 * H * dh * D
    scores = 2 * H * dh * (seq_len + 1)
    dense = moe = 0
    for layer in range(model.n_layers):
        if model.is_moe_layer(layer):
            m = model.moe
            moe += 2 * D * m.num_experts + m.top_k * ffn_flops(D, m.d_ff, m.activation)
            if m.num_shared_experts:
                moe += ffn_flops(D, m.shared_d_ff, m.activation)
            if m.shared_gate:
                moe += 2 * D
        else:
            dense += ffn_flops(D, model.d_ff, model.activation)
    return FlopCount(attention_proj=model.n_layers * proj, attention_scores=model.n_layers * scores,
                     dense_ffn=dense, moe=moe, lm_head=2 * D * model.vocab_size)


def peak_tflops_of(device_name: str | None) -> float | None:
    """The table's peak for a CUDA device name; None for an unknown one (or none: CPU)."""
    if not device_name:
        return None
    for words, tflops in PEAK_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return tflops
    return None


def device_peak(device, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device or None, how it was found) for the run's device: `override`
    (train.peak_tflops), else the table by the CUDA device's name; on CPU none."""
    import torch

    if override:
        return float(override), "train.peak_tflops"
    if getattr(device, "type", None) != "cuda":
        return None, f"no peak FLOP/s known for {getattr(device, 'type', device)} (set train.peak_tflops)"
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_of(name)
    return peak, (f"{name}, dense BF16" if peak else f"no peak FLOP/s known for {name!r} (set train.peak_tflops)")


def flops_line(flops: FlopCount, peak_tflops: float | None, source: str, device) -> str:
    """The run's start line: FLOPs per token, the peak MFU is measured against, what peak memory is."""
    peak = f"MFU against {peak_tflops:g} TFLOP/s per device ({source})" if peak_tflops else f"no MFU: {source}"
    return (f"model FLOPs per token: {flops.forward:,} forward, {flops.train:,} training (3 x forward, recompute "
            f"not counted; docs/training.md); {peak}; peak mem in the step log: rank 0's "
            f"{peak_memory_bytes(device)[1]}")


def step_log_suffix(utilization: float | None, memory_bytes: float) -> str:
    """What the step log line gains: ' | MFU 41.3%' (where a peak is known) ' | peak mem 12.41 GiB'."""
    return (f" | MFU {100 * utilization:.1f}%" if utilization is not None else "") + \
        f" | peak mem {memory_bytes / 2**30:.2f} GiB"


def mfu(train_flops_per_token: float, tokens_per_s: float, devices: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the devices' peak; None without a peak."""
    if not peak_tflops:
        return None
    return train_flops_per_token * tokens_per_s / (devices * peak_tflops * 1e12)


def peak_memory_bytes(device) -> tuple[float, str]:
    """(bytes, what was measured) of this process: CUDA's max allocated on a GPU (no device sync:
    the allocator's counter), else the process's peak resident set size."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return float(rss if sys.platform == "darwin" else rss * 1024), "peak RSS"
