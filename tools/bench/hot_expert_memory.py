"""Peak tensor memory of one MoE layer's forward+backward at EP 2 on CPU/gloo, with and without a
receive budget, when routing is balanced and when one expert is hot.

Legend: T tokens per rank, D model width, F expert hidden width, E experts, K experts per token.

The hot expert is expert 0 (EP rank 0), made every token's first choice by a selection bias of 10
(the top-k router's aux-loss-free bias, `bias_balancing`, not updated here). Cases, each on both
ranks of one pair of gloo processes, one after the other (the profiler counts only what a step
allocates, so an earlier case's cached memory does not hide a later one's):
  unbounded   dropless, no budget: rank 0 receives every first choice, its buffer follows the routing
  drop        `moe.rank_capacity_factor` (cf) with `overflow: drop`
  spill       the same with `overflow: spill`
Peak: the tensor bytes allocated during one forward+backward on each rank, by the profiler's
allocation events (moe_dist/common/tensor_memory.py, the same measure as tools/bench/step_memory.py
and tools/estimate_memory.py --measure), after a warm-up step; gloo's frees are settled as
`tools/estimate_memory.py` does, so the profiler sees each. Rows: what each rank's experts
received (the sum over MoE layers of the experts' row counts).

    python -m tools.bench.hot_expert_memory            # table
    python -m tools.bench.hot_expert_memory --json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

CASES = {"unbounded": {}, "drop": {"overflow": "drop"}, "spill": {"overflow": "spill"}}


def layer_config(case: str, *, tokens: int, d_model: int, d_ff: int, experts: int, top_k: int, cf: float) -> dict:
    extra = CASES[case]
    budget = {"rank_capacity_factor": cf, **extra} if extra else {}
    return dict(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=top_k, ep_size=2, dropless=True,
                activation="gelu", router={"type": "topk", "bias_balancing": True, "bias_update_rate": 0.0},
                aux_loss=dict(switch=0.01, z_loss=0.0), **budget)


def measure_rank(rank: int, case: str, hot: bool, shape: dict) -> dict:
    """On an initialised gloo group of 2: this rank's peak tensor MiB of one step and the rows
    its experts received, after one warm-up step."""
    from moe_dist.common.tensor_memory import peak_tensor_mb
    from moe_dist.moe.config import MoEConfig
    from moe_dist.moe.layer import MoELayer
    from moe_dist.parallel.groups import ParallelGroups
    from tools.estimate_memory import settle_collectives

    settle_collectives()
    groups = ParallelGroups.build(2, shape["experts"])
    layer = MoELayer(MoEConfig.from_dict(layer_config(case, **shape)), seed=0, groups=groups)
    if hot:
        with torch.no_grad():
            layer.router.selection_bias_E[0] = 10.0
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(shape["tokens"], shape["d_model"], generator=g)
    stats = {}

    def step() -> None:
        out = layer(x.clone().requires_grad_())
        (out.y.square().sum() + out.aux_loss).backward()
        stats.update({k: float(v) for k, v in out.stats.items() if k.startswith("pairs_")})
        layer.zero_grad(set_to_none=True)

    step()
    received: list[int] = []
    hook = layer.experts.register_forward_pre_hook(lambda _m, args: received.append(int(args[2].sum())))
    peak = peak_tensor_mb(step)
    hook.remove()
    return {"rank": rank, "peak_tensor_mb": round(peak, 2), "rows_received": received[0], **stats}


def _entry(rank: int, init_file: str, cases: list[tuple[str, bool]], shape: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = [{"case": case, "routing": "hot" if hot else "balanced", **shape, **measure_rank(rank, case, hot, shape)}
                for case, hot in cases]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run(shape: dict, cases: list[tuple[str, bool]] | None = None) -> list[dict]:
    """Both ranks' rows of each (case, hot) (default: every case, balanced then hot)."""
    import torch.multiprocessing as mp

    cases = cases or [(case, hot) for hot in (False, True) for case in CASES]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(os.path.join(tmp, "rendezvous"), cases, shape, tmp), nprocs=2, join=True)
        per_rank = []
        for rank in range(2):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
    return [row for pair in zip(*per_rank) for row in pair]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.hot_expert_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="T per rank")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--cf", type=float, default=1.0, help="moe.rank_capacity_factor of the bounded cases")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shape = dict(tokens=a.tokens, d_model=a.d_model, d_ff=a.d_ff, experts=a.experts, top_k=a.top_k, cf=a.cf)
    rows = run(shape)
    if a.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"T {a.tokens} per rank, D {a.d_model}, F {a.d_ff}, E {a.experts}, K {a.top_k}, EP 2, cf {a.cf}")
    print("| routing | case | rank | rows received | peak tensor MiB | over budget / spilled / dropped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        counts = (f"{r['pairs_over_budget']:.0f} / {r['pairs_spilled']:.0f} / {r['pairs_budget_dropped']:.0f}"
                  if "pairs_over_budget" in r else "-")
        print(f"| {r['routing']} | {r['case']} | {r['rank']} | {r['rows_received']} | {r['peak_tensor_mb']:.1f} | "
              f"{counts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
