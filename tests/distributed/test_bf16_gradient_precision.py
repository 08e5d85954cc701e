"""bf16 training reduces and accumulates gradients in fp32 (moe_dist/train/ds_config.py), in a real
DeepSpeed engine: 2 gloo processes, ep_size 2, ZeRO-2, bf16, gradient accumulation 2. Every
gradient reduction DeepSpeed issues during the backward and the step carries fp32 tensors, the
ZeRO optimizer accumulates into fp32, and the step moves the weights. Without the settings,
DeepSpeed 0.19.8 reduces bf16 tensors and accumulates in bf16 (the second case shows it). The third
case is the one bf16 ZeRO-1 setup moe_dist accepts (bf16 accumulation asked for explicitly): DeepSpeed
takes it on CPU, with fp32 reductions."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tests.harness.train import run_deepspeed_ranks

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.train.config import TrainSection
from moe_dist.train.ds_config import reconcile_deepspeed_config
from moe_dist.train.engine import build_engine

V, S, MICRO, ACCUM = 61, 16, 2, 2
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
              "all_reduce_coalesced")


def _spy_reductions(seen: list[torch.dtype]) -> None:
    """Record the dtype of every floating tensor torch.distributed is asked to reduce."""
    for name in REDUCTIONS:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def spy(*args, _original=original, **kwargs):
            for value in [*args, *kwargs.values()]:
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        seen.append(t.dtype)
            return _original(*args, **kwargs)
        setattr(dist, name, spy)


def _worker(rank: int, world: int, json: dict, expected: tuple[torch.dtype, torch.dtype]) -> None:
    groups = ParallelGroups.from_deepspeed(2, 4)
    train = TrainSection(steps=10, seq_len=S, micro_batch=MICRO, grad_accum=ACCUM, deepspeed_config="-", lr=1e-2,
                         warmup_steps=0)
    ds = reconcile_deepspeed_config({**json, "steps_per_print": 10**9}, train, world)
    cfg = parse_model_config(dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=S,
                                  moe_every=1, num_labels=2),
                             dict(num_experts=4, d_ff=16, top_k=2, dropless=True, ep_size=2))
    model = MoETransformer(cfg, seed=3, groups=groups)
    engine, optimizer, _ = build_engine(model, train, ds)
    comm, accum = expected
    assert engine.communication_data_type == comm
    assert engine.get_data_types() == (torch.bfloat16, accum)
    assert optimizer.gradient_accumulation_dtype == accum
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    seen: list[torch.dtype] = []
    _spy_reductions(seen)
    g = torch.Generator().manual_seed(rank)
    for _ in range(ACCUM):
        tokens = torch.randint(0, V, (MICRO, S + 1), generator=g)
        out = engine(tokens[:, :-1], tokens[:, 1:], torch.zeros(MICRO, S, dtype=torch.long))
        engine.backward(out.loss)
        engine.step()
    assert seen, "no gradient reduction was seen"
    gradient_reductions = [d for d in seen if d != torch.float32]
    assert (gradient_reductions == []) == (comm == torch.float32), f"rank {rank}: reduced dtypes {sorted(set(map(str, seen)))}"
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach().float(), before[n])]
    assert any(".experts." in n for n in moved) and any(".experts." not in n for n in moved), moved


ZERO2_BF16 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0}


@pytest.mark.parametrize("json,expected", [
    (ZERO2_BF16, (torch.float32, torch.float32)),
    # What DeepSpeed does when asked (and what it did by default): bf16 reductions and accumulation.
    ({**ZERO2_BF16, "communication_data_type": "bf16", "data_types": {"grad_accum_dtype": "bf16"}},
     (torch.bfloat16, torch.bfloat16)),
    # ZeRO-1 with bf16 only with bf16 accumulation asked for: still fp32 reductions.
    ({**ZERO2_BF16, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}},
     (torch.float32, torch.bfloat16)),
], ids=["default_fp32", "explicit_bf16", "zero1_bf16_accumulation"])
@pytest.mark.filterwarnings("ignore::moe_dist.train.ds_config.GradientPrecisionWarning")
def test_bf16_engine_reduces_and_accumulates_gradients_in_fp32(json, expected):
    run_deepspeed_ranks(_worker, 2, json, expected)
