"""The layers tools/bench/moe.py puts side by side, built with the same weights and routing:
moe_dist's `MoELayer`, DeepSpeed's `MoE` and the dense floor of the same expert work (the cases
and the fairness rules: tools/bench/moe.py's docstring), each as a `step()` of forward+backward,
and the check that moe_dist and DeepSpeed compute the same function.

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .spec import Spec


# ---------------------------------------------------------------------------------------------
# The three cases. Each builder returns `step()`: one forward+backward that drops the grads at
# its end (as zero_grad(set_to_none=True) would), so every step does the same work, allocates the
# same parameter grads, and leaves nothing behind between steps.
# ---------------------------------------------------------------------------------------------

def make_inputs(spec: Spec, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (a leaf that needs a grad, as a layer's input in a model does) and upstream grad."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(rows, spec.d_model, generator=g).to(spec.device, spec.torch_dtype).requires_grad_()
    grad_y = torch.randn(rows, spec.d_model, generator=g).to(spec.device, spec.torch_dtype)
    return x, grad_y


def build_moe_dist_layer(spec: Spec):
    from moe_dist.moe.config import MoEConfig
    from moe_dist.moe.layer import MoELayer

    cfg = MoEConfig.from_dict(dict(
        d_model=spec.d_model, d_ff=spec.d_ff, num_experts=spec.num_experts, top_k=spec.top_k,
        capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor,
        activation="gelu",
        # DeepSpeed's top-2 gate renormalizes the two chosen weights (its top-1 gate does not);
        # matching it makes both layers compute the same function (`check_same_function`).
        router={"type": "topk", "renormalize": spec.top_k == 2},
        # DeepSpeed's only routing loss is the Switch/GShard balance loss; the z-loss would be
        # extra work (and an extra [T, E] gradient held through the expert backward).
        aux_loss={"switch": 0.01, "z_loss": 0.0}))
    return MoELayer(cfg, seed=spec.seed).to(spec.device, spec.torch_dtype)


def init_single_process_dist() -> None:
    """A one-process torch.distributed group, which DeepSpeed's MoE (and its expert groups) and
    Megatron-Core's model-parallel state need even for one process; a no-op where one exists."""
    from moe_dist.parallel import runtime

    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:  # a free port: several children may initialise one after another
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    runtime.init_distributed()  # DeepSpeed's backend for the device (gloo on CPU, NCCL on CUDA)


def build_deepspeed_layer(spec: Spec, like, ep_size: int = 1):
    """DeepSpeed's MoE with `like`'s (a moe_dist MoELayer at the same `ep_size`) router and local
    expert weights: both place global expert e on rank e // (E / ep_size). `ep_size` 1 starts a
    one-process group itself; above 1 the caller's process group is used."""
    from deepspeed.moe.layer import MoE

    if ep_size == 1:
        init_single_process_dist()
    # With k=1 DeepSpeed picks which tokens overflow by a top-k over a 0/1 mask (ties in no set
    # order), so outputs may differ on overflowing tokens; the work done is the same.
    D, Fw = spec.d_model, spec.d_ff
    expert = nn.Sequential(nn.Linear(D, Fw, bias=False), nn.GELU(), nn.Linear(Fw, D, bias=False))
    layer = MoE(hidden_size=D, expert=expert, num_experts=spec.num_experts, ep_size=ep_size, k=spec.top_k,
                capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor,
                min_capacity=like.cfg.min_capacity, noisy_gate_policy=None, drop_tokens=True,
                use_rts=False, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(like.router.gate.weight_ED)
        for j, ex in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            ex[0].weight.copy_(like.experts.w_in_EDI[j].t())
            ex[2].weight.copy_(like.experts.w_out_EFD[j].t())
    return layer.to(spec.device, spec.torch_dtype)


def _reset_grads(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def make_moe_dist_step(layer, spec: Spec) -> Callable[[], None]:
    x, grad_y = make_inputs(spec, spec.tokens)
    one = torch.ones((), device=spec.device)

    def step() -> None:
        out = layer(x)
        torch.autograd.backward([out.y, out.aux_loss], [grad_y, one])
        _reset_grads(layer, x)

    return step


def make_deepspeed_step(layer, spec: Spec) -> Callable[[], None]:
    x, grad_y = make_inputs(spec, spec.tokens)
    aux_coef = torch.tensor(0.01, device=spec.device)

    def step() -> None:
        y, l_aux, _ = layer(x)
        torch.autograd.backward([y, l_aux], [grad_y, aux_coef])
        _reset_grads(layer, x)

    return step


class DenseFloor(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(spec.seed)
        self.w1 = nn.Parameter((torch.randn(spec.d_model, spec.d_ff, generator=g) * 0.02).to(spec.device, spec.torch_dtype))
        self.w2 = nn.Parameter((torch.randn(spec.d_ff, spec.d_model, generator=g) * 0.02).to(spec.device, spec.torch_dtype))

    def forward(self, x):
        return F.gelu(x @ self.w1) @ self.w2


def make_floor_step(spec: Spec) -> Callable[[], None]:
    floor = DenseFloor(spec)
    x, grad_y = make_inputs(spec, spec.tokens * spec.top_k)

    def step() -> None:
        floor(x).backward(grad_y)
        _reset_grads(floor, x)

    return step


@torch.no_grad()
def check_same_function(md_layer, ds_layer, spec: Spec) -> dict:
    """Fairness check: both layers route identically and agree on every token whose choices were
    all kept (tokens with a dropped choice differ by design: DeepSpeed renormalizes the weights
    after the capacity drop, moe_dist before it). Skipped (None) for top_k > 2 (module docstring)."""
    from moe_dist.moe.capacity import assign_slots
    from moe_dist.routing.base import RoutingContext

    if spec.top_k > 2:
        return {"same_routing": None, "max_abs_diff_kept": None, "kept_fraction": None}
    x, _ = make_inputs(spec, spec.tokens)
    out = md_layer(x)
    y_ds, _, load_ds = ds_layer(x)
    route = md_layer.router(x, RoutingContext(training=True))
    plan = assign_slots(route.idx_TK, spec.num_experts, md_layer.capacity(spec.tokens), "position")
    all_kept = plan.keep_TK.all(dim=1)
    same_load = torch.equal(out.stats["tokens_per_expert"].long(), load_ds.long())
    diff = (out.y - y_ds)[all_kept].abs().max().float().item() if all_kept.any() else 0.0
    return {"same_routing": bool(same_load), "max_abs_diff_kept": diff,
            "kept_fraction": float(plan.keep_TK.float().mean())}
