"""The balance losses' invariance contract (docs/training.md, "Balance-loss scopes"; issue 22).

For each scope of the switch and importance losses (and the z-loss, per rank by definition), an
expert-parallel run on CPU/gloo over `world` ranks (ep_size x data-parallel replicas) with
`grad_accum` micro batches, expert recompute or not, padded or not, equals one process holding
the same tokens: every micro batch's loss values (mean over ranks), the routing statistics
(summed over ranks), every gradient of the step and one AdamW step. The single process is the
reference layer with `capacity_groups=world` (each group one rank's tokens, for the drops and
the per-rank losses), handed the same running step counts.

What each scope's value is, independently of the layer's code (`expected_losses`, computed here
from the reference router's probabilities with masked Python loops), is the contract itself,
including where a scope depends on the layout by definition:

- dp_global: f and P over every rank's real tokens of the micro batch; the step's loss is the mean
  over its micro batches (the engine divides each micro batch's loss by grad_accum).
- micro_batch: each rank's own real tokens; the value is the mean over ranks of the per-rank
  losses (a rank without a real token adds 0), and the step's loss the mean over micro batches.
- sequence: each sequence (a row, or a packed document of a row) with a real token is one loss;
  the value is their mean over every rank's sequences of the micro batch, so the layout of rows
  over ranks does not change it; the step's loss is the mean over micro batches.
- global_batch: micro batch m's f counts the real pairs of micro batches 1..m of every rank (the
  running counts), P micro batch m's real tokens of every rank; importance the same running sum.
  With grad_accum 1 it is dp_global.
"""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.base import RoutingContext

ROWS_PER_RANK, SEQ, D_MODEL, D_FF, NUM_EXPERTS, TOP_K, SEED = 2, 6, 16, 64, 8, 2, 5
TOL = dict(rtol=2e-5, atol=2e-6)
SCOPES = ("dp_global", "micro_batch", "sequence", "global_batch")
SUMMED_STATS = ("tokens_per_expert", "tokens_per_expert_kept", "num_tokens", "importance", "entropy_token_sum")


def make_cfg(ep_size: int, scope: str) -> MoEConfig:
    # capacity_factor 1.0 with min_capacity 1 drops pairs: the losses are defined before drops.
    return MoEConfig.from_dict(dict(
        d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, top_k=TOP_K, capacity_factor=1.0, min_capacity=1,
        ep_size=ep_size, aux_loss=dict(switch=0.1, importance=0.1, z_loss=0.01, switch_scope=scope,
                                       importance_scope=scope)))


def make_batches(world: int, grad_accum: int, padded: bool, documents: bool, seed: int):
    """Per micro batch: x [W*B, S, D], the output weights G, valid [W*B, S] (None unpadded) and
    segment ids [W*B, S] (None without documents). Identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    rows = world * ROWS_PER_RANK
    for _ in range(grad_accum):
        x = torch.randn(rows, SEQ, D_MODEL, generator=gen)
        G = torch.randn(rows, SEQ, D_MODEL, generator=gen)
        valid = segments = None
        if padded:
            lengths = torch.randint(1, SEQ + 1, (rows,), generator=gen)
            lengths[0], lengths[-1] = 0, SEQ  # a row of padding only, and a full row
            valid = torch.arange(SEQ)[None, :] < lengths[:, None]
            # Padding holds garbage that would show in any loss or count it leaked into.
            x = torch.where(valid[..., None], x, 50.0 * torch.randn(rows, SEQ, D_MODEL, generator=gen))
        if documents:
            starts = torch.rand(rows, SEQ, generator=gen) < 0.35
            starts[:, 0] = False
            segments = torch.cumsum(starts.long(), dim=1)
        batches.append((x, G, valid, segments))
    return batches


def rank_slice(t: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    return None if t is None else shard(t, rank, world)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


def expected_losses(ref: MoELayer, batches, world: int, scope: str) -> list[dict[str, float]]:
    """Each micro batch's switch, importance and z-loss by the scope's definition (module
    docstring), from the reference router's probabilities; loops over ranks and sequences."""
    E = NUM_EXPERTS
    out = []
    step_load = torch.zeros(E)
    step_importance = torch.zeros(E)
    for x, _, valid, segments in batches:
        with torch.no_grad():
            route = ref.router(x.reshape(-1, D_MODEL), RoutingContext(training=True))
        probs, idx = route.probs_TE.float(), route.idx_TK
        lse2 = torch.logsumexp(route.logits_TE.float(), -1).square()
        T = probs.shape[0]
        real = torch.ones(T, dtype=torch.bool) if valid is None else valid.reshape(-1)

        def load(sel: torch.Tensor) -> torch.Tensor:
            return torch.zeros(E).index_add_(0, idx[sel].reshape(-1), torch.ones(int(sel.sum()) * TOP_K))

        def switch(load_E: torch.Tensor, sel: torch.Tensor) -> float:
            if not sel.any():
                return 0.0
            return float(E * (load_E / load_E.sum() * probs[sel].mean(0)).sum())

        def cv2(I_E: torch.Tensor) -> float:
            return float(I_E.var(unbiased=False) / I_E.mean().square()) if I_E.sum() > 0 else 0.0

        def per_rank(fn) -> float:
            n = T // world
            return sum(fn((torch.arange(T) // n == r) & real) for r in range(world)) / world

        z = per_rank(lambda sel: float(lse2[sel].mean()) if sel.any() else 0.0)
        if scope == "dp_global":
            value = dict(switch=switch(load(real), real), importance=cv2(probs[real].sum(0)))
        elif scope == "micro_batch":
            value = dict(switch=per_rank(lambda sel: switch(load(sel), sel)),
                         importance=per_rank(lambda sel: cv2(probs[sel].sum(0))))
        elif scope == "sequence":
            row = torch.arange(T) // SEQ
            key = row if segments is None else row * SEQ + segments.reshape(-1)
            chosen = [key == k for k in key[real].unique()]
            sequences = [sel & real for sel in chosen]
            value = dict(switch=sum(switch(load(s), s) for s in sequences) / len(sequences),
                         importance=sum(cv2(probs[s].sum(0)) for s in sequences) / len(sequences))
        else:  # global_batch
            step_load += load(real)
            step_importance += probs[real].sum(0)
            value = dict(switch=switch(step_load, real), importance=cv2(step_importance))
        out.append(dict(value, z_loss=z))
    return out


def check_case(rank: int, world: int, groups: ParallelGroups, scope: str, grad_accum: int, recompute: str,
               padded: bool) -> None:
    documents = padded and scope == "sequence"
    what = f"rank {rank} world {world} ep {groups.ep_size} {scope} ga {grad_accum} {recompute} padded {padded}"
    batches = make_batches(world, grad_accum, padded, documents, seed=100 * SCOPES.index(scope) + 10 * grad_accum + padded)

    ref = MoELayer(make_cfg(1, scope), seed=SEED, recompute=recompute)
    layer = MoELayer(make_cfg(groups.ep_size, scope), seed=SEED, groups=groups, recompute=recompute)
    expected = expected_losses(ref, batches, world, scope)
    running_ref = running = None
    x_grads = []
    for m, (x, G, valid, segments) in enumerate(batches):
        mask = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
        x_ref = x.clone().requires_grad_()
        out_ref = ref(x_ref, MoESideInputs(capacity_groups=world, valid_T=_flat(valid),
                                           segment_ids_T=_flat(segments), step_counts=running_ref))
        running_ref = {0: out_ref.step_counts} if out_ref.step_counts is not None else None
        loss_ref = (out_ref.y * G * mask[..., None]).sum() / world + out_ref.aux_loss
        (loss_ref / grad_accum).backward()

        x_r = shard(x, rank, world).clone().requires_grad_()
        out = layer(x_r, MoESideInputs(valid_T=_flat(rank_slice(valid, rank, world)),
                                       segment_ids_T=_flat(rank_slice(segments, rank, world)), step_counts=running))
        running = {0: out.step_counts} if out.step_counts is not None else None
        loss = (out.y * shard(G, rank, world) * shard(mask, rank, world)[..., None]).sum() + out.aux_loss
        (loss / grad_accum).backward()
        x_grads.append((x_r, x_ref))

        assert (out.step_counts is not None) == (scope == "global_batch"), what
        for name in ("switch", "importance", "z_loss"):
            mean = groups.all_reduce_sum_dp(out.losses[name].detach().clone()) / world
            torch.testing.assert_close(mean, out_ref.losses[name].detach(), **TOL,
                                       msg=lambda msg: f"{name} micro batch {m} {what}: {msg}")
            torch.testing.assert_close(out_ref.losses[name].item(), expected[m][name], **TOL,
                                       msg=lambda msg: f"{name} by definition, micro batch {m} {what}: {msg}")
        for name in SUMMED_STATS:
            summed = groups.all_reduce_sum_dp(out.stats[name].clone())
            torch.testing.assert_close(summed, out_ref.stats[name], **TOL, msg=lambda msg: f"{name} {what}: {msg}")
        if valid is not None:
            assert out_ref.stats["num_tokens"].item() == valid.sum().item(), what

    for m, (x_r, x_ref) in enumerate(x_grads):
        # The local loss is W times this rank's share of the mean loss.
        torch.testing.assert_close(x_r.grad / world, shard(x_ref.grad, rank, world), **TOL,
                                   msg=lambda msg: f"input grad micro batch {m} {what}: {msg}")
    reduce_gradients(layer, groups)
    lo, hi = layer.first_expert, layer.first_expert + layer.cfg.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi] if name.startswith("experts.") else t

    assert_grads_and_adamw_step_match(layer, ref, ref_slice, what, **TOL)


def _worker(rank: int, world: int, ep_size: int, cases: list[tuple]) -> None:
    groups = ParallelGroups.build(ep_size, NUM_EXPERTS)
    for case in cases:
        check_case(rank, world, groups, *case)


def grid(scopes=SCOPES, accums=(1, 2, 4), recomputes=("none", "experts"), padding=(False, True)) -> list[tuple]:
    return [(s, a, r, p) for s in scopes for a in accums for r in recomputes for p in padding]


# world = ep_size x data-parallel replicas of each expert (ParallelGroups: world / ep_size).
LAYOUTS = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4)]


@pytest.mark.parametrize("world,ep_size,cases", [
    # Every scope, padded, with and without accumulation: two ranks of one EP group ...
    pytest.param(2, 2, grid(accums=(1, 2), recomputes=("none",), padding=(True,)), id="ep2"),
    # ... and two expert-data-parallel replicas of it, with expert recompute, four micro batches,
    # for the scopes that accumulation changes.
    pytest.param(4, 2, grid(scopes=("micro_batch", "global_batch"), accums=(4,), recomputes=("experts",),
                            padding=(True,)), id="ep2x2"),
])
def test_balance_losses_match_one_process(world, ep_size, cases):
    run_distributed(_worker, world, ep_size, cases)


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size", LAYOUTS, ids=[f"world{w}-ep{e}" for w, e in LAYOUTS])
def test_balance_losses_match_one_process_full_grid(world, ep_size):
    run_distributed(_worker, world, ep_size, grid())
