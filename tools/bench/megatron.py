"""Megatron-Core's MoE layer as a case of tools/bench/moe.py (GPU only).

Built as Megatron's GPT layer spec builds it: `MoELayer` with its top-k router (softmax, aux loss
0.01), the `alltoall` token dispatcher at EP=1 and no tensor parallelism, bias-free GELU experts of
the same widths, the same capacity factor with drops (`moe_expert_capacity_factor`, no padding).
Its experts are the grouped-GEMM `TEGroupedMLP` where Transformer Engine is installed, the legacy
`GroupedMLP` where the `grouped_gemm` package is, else `SequentialMLP` (one Linear pair per
expert); `mlp_choice()` says which, and the row reports it. Weights are Megatron's own random
init (routing is not compared with moe_dist's; the work per token is the same: top-k of E).

Megatron-Core's MoE layer and dispatcher call `torch.cuda` unconditionally, so on CPU the case is
refused with that reason (`Unavailable`), and the benchmark reports it as skipped.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F


class Unavailable(RuntimeError):
    """The case cannot run here; the message says why."""


def mlp_choice() -> tuple[bool, bool, str]:
    """(moe_grouped_gemm, moe_use_legacy_grouped_gemm, name of the expert MLP Megatron builds)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return True, False, "TEGroupedMLP (Transformer Engine grouped GEMM)"
    if importlib.util.find_spec("grouped_gemm") is not None:
        return True, True, "GroupedMLP (grouped_gemm package)"
    return False, False, "SequentialMLP (one Linear pair per expert; neither transformer_engine nor grouped_gemm is installed)"


def _init_parallel_state(seed: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)


def build_megatron_layer(spec, dtype: torch.dtype):
    """Megatron-Core's MoELayer for `spec` (tools/bench/spec.py) on the current CUDA device."""
    if spec.device != "cuda" or not torch.cuda.is_available():
        raise Unavailable("Megatron-Core's MoE layer and alltoall dispatcher are CUDA-only "
                          "(they call torch.cuda unconditionally)")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    _init_parallel_state(spec.seed)
    grouped, legacy, _ = mlp_choice()
    config = TransformerConfig(
        num_layers=1, hidden_size=spec.d_model, num_attention_heads=8, ffn_hidden_size=spec.d_ff,
        moe_ffn_hidden_size=spec.d_ff, num_moe_experts=spec.num_experts, moe_router_topk=spec.top_k,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped,
        moe_expert_capacity_factor=spec.capacity_factor, moe_pad_expert_input_to_capacity=False,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        activation_func=F.gelu, gated_linear_unit=False, add_bias_linear=False,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_cpu_initialization=False)
    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=grouped,
                                          moe_use_legacy_grouped_gemm=legacy)
    layer = MoELayer(config, submodules=layer_spec.submodules.mlp.submodules)
    return layer.to(device="cuda", dtype=dtype)


def make_megatron_step(layer, spec, make_inputs: Callable) -> Callable[[], None]:
    """One forward+backward; Megatron takes [sequence, batch, hidden] (one sequence of T tokens).
    Its aux loss is attached to the output by its autograd hook, so one backward covers it."""
    x, grad_y = make_inputs(spec, spec.tokens)
    x3, g3 = x.detach().view(spec.tokens, 1, spec.d_model).requires_grad_(), grad_y.view(spec.tokens, 1, -1)

    def step() -> None:
        y, _bias = layer(x3)
        y.backward(g3)
        layer.zero_grad(set_to_none=True)
        x3.grad = None

    return step
