"""The correctness part of tools/bench/gpu_check.py: each check runs on `device` and returns a
row {name, status (pass / fail / skipped: reason), measured, tolerance}. Tolerances and what is
compared: tools/bench/gpu_check.py's docstring. Sizes are small enough for CPU and meaningful on a
GPU (several experts, drops that bind, top-k > 1).
"""

from __future__ import annotations

import copy

import torch

from moe_dist.kernels import grouped_mm
from moe_dist.kernels.portable import torch_grouped_mm_supported
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.capacity import assign_slots
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.experts import ffn_activation
from moe_dist.moe.layer import MoELayer
from moe_dist.routing.base import RoutingContext

T, D, F_W, E, K = 256, 128, 256, 16, 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def row(name: str, ok: bool, measured, tolerance) -> dict:
    return {"name": name, "status": "pass" if ok else "fail", "measured": measured, "tolerance": tolerance}


def layer_cfg(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=F_W, num_experts=E, top_k=K, dropless=True, aux_loss=dict(switch=0.01, z_loss=0.001))
    return MoEConfig.from_dict(dict(base, **kw))


def inputs(device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g).to(device), torch.randn(T, D, generator=g).to(device)


def layer_bf16_vs_fp32(device: str) -> dict:
    ref = MoELayer(layer_cfg(), seed=1).to(device)
    low = copy.deepcopy(ref).to(torch.bfloat16)
    x, g = inputs(device)
    x32, x16 = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    y32, y16 = ref(x32).y, low(x16).y
    (y32 * g).sum().backward()
    (y16.float() * g).sum().backward()
    with torch.no_grad():
        ctx = RoutingContext(training=True)
        same = (ref.router(x, ctx).idx_TK == low.router(x.to(torch.bfloat16), ctx).idx_TK).all(dim=1)
    measured = {"output": rel(y16[same], y32[same]), "input_grad": rel(x16.grad, x32.grad),
                "w_in_grad": rel(low.experts.w_in_EDI.grad, ref.experts.w_in_EDI.grad),
                "tokens_routed_alike": float(same.float().mean())}
    ok = measured["output"] <= 2e-2 and max(measured["input_grad"], measured["w_in_grad"]) <= 5e-2
    return row("layer_bf16_vs_fp32", ok, measured, "output <= 2e-2 (tokens routed alike), grads <= 5e-2")


def grouped_mm_vs_loop(device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(2)
    counts = [37, 0, 64, 5, 100, 16, 48, 30]  # uneven, one empty expert
    x = torch.randn(sum(counts), D, generator=g).to(device, dtype)
    w = (torch.randn(len(counts), D, F_W, generator=g) * 0.05).to(device, dtype)
    if not torch_grouped_mm_supported(x, w):
        return {"name": "grouped_mm_vs_loop", "status": f"skipped: torch._grouped_mm does not take {dtype} on "
                f"{device} here", "measured": None, "tolerance": None}
    outs = {}
    for backend in ("grouped_mm", "loop"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_mm(xb, wb, counts, backend)
        y.backward(torch.ones_like(y))
        outs[backend] = (y, xb.grad, wb.grad)
    measured = {k: rel(a, b) for k, a, b in zip(("output", "input_grad", "weight_grad"), outs["grouped_mm"], outs["loop"])}
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    return row("grouped_mm_vs_loop", max(measured.values()) <= tol, measured, f"<= {tol} ({dtype})")


def loop_reference(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """y_t = sum_k w_tk * expert_idx(x_t) over kept pairs, one token-expert pair at a time."""
    with torch.no_grad():
        route = layer.router(x, RoutingContext(training=layer.training))
        plan = assign_slots(route.idx_TK, E, layer.capacity(x.shape[0]), layer.cfg.drop_policy,
                            priority_TK=route.w_TK)
        y = torch.zeros_like(x)
        w_in, w_out = layer.experts.w_in_EDI, layer.experts.w_out_EFD
        for e in range(E):
            t, k = ((route.idx_TK == e) & plan.keep_TK).nonzero(as_tuple=True)
            h = ffn_activation(x[t] @ w_in[e], layer.cfg.activation) @ w_out[e]
            y.index_add_(0, t, h * route.w_TK[t, k, None])
        return y, float(1 - plan.keep_TK.float().mean())


def dropless_and_capacity(device: str) -> list[dict]:
    rows = []
    for name, kw in (("dropless", dict(dropless=True)), ("capacity", dict(dropless=False, capacity_factor=1.0))):
        layer = MoELayer(layer_cfg(**kw), seed=3).to(device)
        x, _ = inputs(device, seed=4)
        with torch.no_grad():
            y = layer(x).y
        ref, dropped = loop_reference(layer, x)
        err = rel(y, ref)
        drops_ok = dropped == 0 if name == "dropless" else dropped > 0
        rows.append(row(name, err <= 1e-5 and drops_ok, {"rel_error": err, "dropped_fraction": dropped},
                        "rel <= 1e-5 vs per-token loop; capacity 1.0 drops pairs, dropless none"))
    return rows


def small_model(device: str, recompute: str = "none") -> MoETransformer:
    cfg = parse_model_config(dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64,
                                  moe_every=1, moe_recompute=recompute),
                             dict(num_experts=8, d_ff=128, top_k=4, capacity_factor=1.0, eval_capacity_factor=2.0))
    return MoETransformer(cfg, seed=5).to(device)


def tokens(device: str) -> torch.Tensor:
    return torch.randint(0, 97, (4, 65), generator=torch.Generator().manual_seed(6)).to(device)


def eval_determinism(device: str) -> dict:
    model = small_model(device).eval()
    tok = tokens(device)
    with torch.no_grad():
        a, b = model(tok[:, :-1]).logits_BSV, model(tok[:, :-1]).logits_BSV
    return row("eval_determinism", torch.equal(a, b), {"max_abs_diff": float((a - b).abs().max())}, "bit-equal")


def recompute_gradients(device: str) -> list[dict]:
    tok = tokens(device)
    results = {}
    for mode in ("none", "activation", "experts"):
        model = small_model(device, mode)
        out = model(tok[:, :-1], tok[:, 1:])
        out.loss.backward()
        results[mode] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    rows = []
    loss0, grads0 = results["none"]
    for mode in ("activation", "experts"):
        loss, grads = results[mode]
        worst = max(rel(grads[n], g) for n, g in grads0.items())
        exact = torch.equal(loss, loss0) and all(torch.equal(grads[n], g) for n, g in grads0.items())
        ok = exact if device == "cpu" else worst <= 1e-6
        rows.append(row(f"recompute_gradients[{mode}]", ok, {"bit_equal": exact, "worst_rel_grad_diff": worst},
                        "bit-equal on CPU, <= 1e-6 relative on CUDA"))
    return rows


def correctness_part(device: str) -> dict:
    checks = [layer_bf16_vs_fp32(device), grouped_mm_vs_loop(device), *dropless_and_capacity(device),
              eval_determinism(device), *recompute_gradients(device)]
    return {"checks": checks, "failed": [c["name"] for c in checks if c["status"] == "fail"]}
