"""A full model step under DeepSpeed's engine with expert parallelism equals one process.

2 gloo processes, ep_size 2, ZeRO-1 or ZeRO-2, fp32, gradient accumulation 2 and active gradient
clipping, against a single plain-PyTorch process holding the same global batch and weights:
same losses, same global grad norm (expert norms counted once each), same parameters after two
optimizer steps. This is what proves DeepSpeed reduces our expert gradients over the right group
with the right scale (the MoE marker in moe_dist/train/engine.py). Dropless routing: capacity is
per rank, so only without drops do the two sides route identically batch by batch.
"""

from __future__ import annotations

import pytest
import torch
from tests.harness.train import run_deepspeed_ranks

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import TrainSection
from moe_dist.train.ds_config import reconcile_deepspeed_config
from moe_dist.train.engine import build_engine, optimizer_param_groups
from moe_dist.train.schedule import build_lr_scheduler

V, S, MICRO, ACCUM, STEPS, SEED = 61, 16, 2, 2, 2, 21
CLIP = 0.05  # well below the gradient norm, so clipping scales every step
TOL = dict(rtol=1e-4, atol=1e-6)


def model_cfg(ep_size: int):
    return parse_model_config(
        dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=S, moe_every=1,
             num_labels=2, tie_embeddings=False),
        dict(num_experts=4, d_ff=16, top_k=2, dropless=True, ep_size=ep_size,
             aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1)))


def train_section() -> TrainSection:
    # eps well above fp32 noise: Adam turns 1e-9 noise in a ~0 gradient into a full step.
    return TrainSection(steps=10, seq_len=S, micro_batch=MICRO, grad_accum=ACCUM, deepspeed_config="-",
                        lr=1e-2, warmup_steps=2, weight_decay=0.1, adam_eps=1e-4)


def global_batches(world: int):
    """[step][micro] -> (tokens [world*MICRO, S+1], domains [world*MICRO, S])."""
    g = torch.Generator().manual_seed(5)
    return [[(torch.randint(0, V, (world * MICRO, S + 1), generator=g),
              torch.randint(-1, 2, (world * MICRO, S), generator=g)) for _ in range(ACCUM)]
            for _ in range(STEPS)]


def reference(world: int):
    """Plain PyTorch, one process: per micro step the ranks' rows together, capacity and losses
    per rank-sized group; gradients accumulated; clip; AdamW; the same LR schedule."""
    model = MoETransformer(model_cfg(1), seed=SEED)
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-2, eps=1e-4, betas=(0.9, 0.95))
    sched = build_lr_scheduler(opt, train_section())
    losses, norms = [], []
    for step in global_batches(world):
        for tokens, domains in step:
            out = model(tokens[:, :-1], tokens[:, 1:], domains, capacity_groups=world)
            (out.loss / ACCUM).backward()
            losses.append(float(out.loss))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, losses, norms


def _worker(rank: int, world: int, stage: int) -> None:
    groups = ParallelGroups.from_deepspeed(2, 4)
    train = train_section()
    ds = reconcile_deepspeed_config({"zero_optimization": {"stage": stage}, "gradient_clipping": CLIP,
                                     "steps_per_print": 10**9}, train, world)
    model = MoETransformer(model_cfg(2), seed=SEED, groups=groups)
    engine, _, _ = build_engine(model, train, ds)
    losses, norms = [], []
    for step in global_batches(world):
        for tokens, domains in step:
            rows = slice(rank * MICRO, (rank + 1) * MICRO)
            tokens, domains = tokens[rows], domains[rows]
            out = engine(tokens[:, :-1], tokens[:, 1:], domains)
            engine.backward(out.loss)
            engine.step()
            losses.append(float(groups.all_reduce_sum_dp(out.loss.detach())) / world)
        norms.append(float(engine.get_global_grad_norm()))

    ref, ref_losses, ref_norms = reference(world)
    what = f"ZeRO-{stage} rank {rank}"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL, msg=lambda m: f"{what} losses: {m}")
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL, msg=lambda m: f"{what} grad norms: {m}")
    assert min(ref_norms) > 2 * CLIP  # clipping was active on every step
    ref_params = dict(ref.named_parameters())
    lo, hi = groups.ep_rank * 2, groups.ep_rank * 2 + 2
    for name, p in model.named_parameters():
        expected = ref_params[name][lo:hi] if ".experts." in name else ref_params[name]
        torch.testing.assert_close(p.detach(), expected.detach(), **TOL, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_engine_step_matches_single_process(stage):
    run_deepspeed_ranks(_worker, 2, stage)
