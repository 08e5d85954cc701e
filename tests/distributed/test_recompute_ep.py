"""Expert-only recompute under expert parallelism (2 gloo processes, ep 2): outputs, losses,
statistics, router buffers and every gradient bit-equal to no recompute, the EP run equal to the
single-process reference, and the router, the all-to-alls and the statistics all-reduce counted
once per step (a whole-layer checkpoint, which runs them twice, is caught by the same counters).
"""

from __future__ import annotations

import torch
from tests.harness.dist import run_distributed, shard
from torch.utils.checkpoint import checkpoint

import moe_dist.moe.dispatch as dispatch_module
import moe_dist.parallel.all_to_all as a2a_module
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups

TOKENS_PER_RANK, D_MODEL, D_FF, NUM_EXPERTS, SEED = 32, 16, 64, 8, 3
MODES = ("activation", "experts")
LAYER_CASES = [
    dict(top_k=4, router={"type": "topk"}),  # capacity 1.0 drops pairs
    dict(top_k=2, dropless=True, num_shared_experts=1, router={"type": "topk"}),
    dict(top_k=2, router={"type": "inhibition", "mode": "subtractive", "stat": "ema"}),  # EMA buffer
]


def make_cfg(ep_size: int, case: dict) -> MoEConfig:
    return MoEConfig.from_dict(dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, capacity_factor=1.0,
                                    min_capacity=1, ep_size=ep_size,
                                    aux_loss=dict(switch=0.1, z_loss=0.01), **case))


class Counters:
    """Counts, in this process, router forwards, token all-to-alls (forward and backward each
    call `_all_to_all`), count exchanges and statistics all-reduces."""

    def __init__(self, monkeypatch_like: list) -> None:
        self.calls = {"router": 0, "all_to_all": 0, "exchange_counts": 0, "all_reduce": 0}
        self._undo = monkeypatch_like

    def wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls[key] += 1
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append((owner, name, original))

    def reset(self) -> dict:
        out, self.calls = self.calls, dict.fromkeys(self.calls, 0)
        return out


def install_counters(layers: list[MoELayer]) -> tuple[Counters, list]:
    undo: list = []
    counters = Counters(undo)
    counters.wrap(a2a_module, "_all_to_all", "all_to_all")
    counters.wrap(dispatch_module, "exchange_counts", "exchange_counts")
    counters.wrap(ParallelGroups, "all_reduce_sum_dp", "all_reduce")
    for layer in layers:
        counters.wrap(layer.router, "forward", "router")
    return counters, undo


def uninstall(undo: list) -> None:
    for owner, name, original in reversed(undo):
        setattr(owner, name, original)


def run_step(layer: MoELayer, x: torch.Tensor, G: torch.Tensor, groups: ParallelGroups, whole_layer: bool = False):
    x = x.clone().requires_grad_()
    if whole_layer:  # the wrong way: the router, dispatch and statistics run again in backward
        def whole(t):
            o = layer(t)
            return o.y, o.aux_loss

        y, aux = checkpoint(whole, x, use_reentrant=False)
        out = None
    else:
        out = layer(x)
        y, aux = out.y, out.aux_loss
    loss = (y * G).sum() + aux
    loss.backward()
    reduce_gradients(layer, groups)
    return out, loss.detach(), x.grad


def check_layer(rank: int, world: int, groups: ParallelGroups, case: dict, mode: str) -> None:
    what = f"rank {rank} {case} {mode}"
    torch.manual_seed(99)
    x = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    G = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    x_r, G_r = shard(x, rank, world), shard(G, rank, world)
    plain = MoELayer(make_cfg(2, case), seed=SEED, groups=groups)
    recomputed = MoELayer(make_cfg(2, case), seed=SEED, groups=groups, recompute=mode)
    wrong = MoELayer(make_cfg(2, case), seed=SEED, groups=groups, recompute=mode)
    counters, undo = install_counters([plain, recomputed, wrong])
    try:
        out_a, loss_a, gx_a = run_step(plain, x_r, G_r, groups)
        calls_plain = counters.reset()
        out_b, loss_b, gx_b = run_step(recomputed, x_r, G_r, groups)
        calls_recomputed = counters.reset()
        run_step(wrong, x_r, G_r, groups, whole_layer=True)
        calls_wrong = counters.reset()
    finally:
        uninstall(undo)
    # Once per step: one router forward, the dispatch and combine all-to-alls and their two
    # reverses in backward, one count exchange; the same with recompute as without.
    assert calls_plain["router"] == 1 and calls_plain["all_to_all"] == 4, calls_plain
    assert calls_plain["exchange_counts"] == 1, calls_plain
    assert calls_recomputed == calls_plain, (what, calls_recomputed, calls_plain)
    # The counters see a recompute of the whole layer: every count but the backward-only ones doubles.
    assert calls_wrong["router"] == 2 and calls_wrong["exchange_counts"] == 2, calls_wrong
    assert calls_wrong["all_to_all"] == 6 and calls_wrong["all_reduce"] > calls_plain["all_reduce"], calls_wrong

    assert torch.equal(out_a.y, out_b.y) and torch.equal(loss_a, loss_b), what
    assert torch.equal(gx_a, gx_b), what
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(p.grad, q.grad), f"grad of {name} {what}"
    for (name, b), c in zip(plain.named_buffers(), recomputed.buffers()):
        assert torch.equal(b, c), f"buffer {name} {what}"
    for key, value in out_a.stats.items():
        assert torch.equal(value, out_b.stats[key]), f"stat {key} {what}"

    # And the recomputed EP run equals one process holding every rank's tokens.
    ref = MoELayer(make_cfg(1, case), seed=SEED, recompute=mode)
    x_ref = x.clone().requires_grad_()
    out_ref = ref(x_ref, MoESideInputs(capacity_groups=world))
    ((out_ref.y * G).sum() / world + out_ref.aux_loss).backward()
    tol = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out_b.y, shard(out_ref.y, rank, world), **tol)
    torch.testing.assert_close(gx_b / world, shard(x_ref.grad, rank, world), **tol)
    lo, hi = recomputed.first_expert, recomputed.first_expert + recomputed.cfg.num_local_experts
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in recomputed.named_parameters():
        expected = ref_grads[name][lo:hi] if name.startswith("experts.") else ref_grads[name]
        torch.testing.assert_close(p.grad, expected, **tol, msg=lambda m: f"{name} vs reference {what}: {m}")


def check_model(rank: int, world: int, groups: ParallelGroups, mode: str) -> None:
    """A whole model at ep 2: loss and every gradient bit-equal with and without recompute."""
    def build(recompute: str) -> MoETransformer:
        cfg = parse_model_config(
            dict(vocab_size=53, d_model=D_MODEL, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe_every=1,
                 moe_recompute=recompute),
            dict(num_experts=NUM_EXPERTS, d_ff=D_FF, top_k=4, capacity_factor=1.0, ep_size=2))
        return MoETransformer(cfg, seed=SEED, groups=groups)

    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 53, (2, 13), generator=g)
    results = []
    for model in (build("none"), build(mode)):
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        reduce_gradients(model, groups)
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b), (rank, mode)
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), f"model grad {name} rank {rank} {mode}"


def _worker(rank: int, world: int) -> None:
    groups = ParallelGroups.build(2, NUM_EXPERTS)
    for mode in MODES:
        for case in LAYER_CASES:
            check_layer(rank, world, groups, case, mode)
        check_model(rank, world, groups, mode)


def test_recompute_under_expert_parallelism():
    run_distributed(_worker, 2)
