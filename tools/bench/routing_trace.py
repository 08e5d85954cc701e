"""What the routing trace costs a training step: one rank's step (forward, backward, AdamW) of a
config's model untraced and traced (the layer's records read to the host, rows buffered, the
step's Parquet file written), interleaved rounds, median per case; and the file's size.

    python -m tools.bench.routing_trace --config configs/tiny_cpu.yaml --json

One process at ep_size 1 with the config's micro batch: the trace's work per rank, not an EP run's
collectives (those are the same traced or not). Numbers: BENCHMARKS.md, "Routing trace".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from moe_dist.evaluate.trace_format import model_identity
from moe_dist.evaluate.trace_writer import TraceWriter, trace_meta
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.config import load_run_config
from tools.bench.timing import time_cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--tokens", default=None, help="trace.tokens (default: the config's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = ["moe.ep_size=1"] + ([f"trace.tokens={args.tokens}"] if args.tokens else [])
    cfg = load_run_config(args.config, overrides)
    train, trace = cfg.train, cfg.trace
    model = MoETransformer(cfg.model, seed=train.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (train.micro_batch, train.seq_len + 1), generator=gen)
    domains = torch.randint(0, max(cfg.model.num_labels, 1), (train.micro_batch, train.seq_len), generator=gen)
    out_dir = tempfile.mkdtemp(prefix="trace_bench_")
    writer = TraceWriter(out_dir, trace_meta(model_identity(cfg.model), source="bench", world_size=1, ep_size=1),
                         rank=0, top_k=cfg.model.moe.top_k, tokens=trace.tokens_per_layer, eod=None,
                         max_total_bytes=1 << 40)
    step_no = [0]

    def step(traced: bool) -> None:
        out = model(tokens[:, :-1], tokens[:, 1:], domains, trace=traced)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if traced:
            writer.add(0, tokens[:, :-1], domains, out.routes)
            step_no[0] += 1
            writer.flush("train", step_no[0])

    wall, cpu = time_cases({"untraced": lambda: step(False), "traced": lambda: step(True)},
                           args.warmup, args.repeats)
    last = os.path.join(out_dir, sorted(os.listdir(out_dir))[-1])
    row = {"config": args.config, "tokens_per_layer": trace.tokens, "moe_layers": len(cfg.model.moe_layer_indices),
           "micro_batch_tokens": train.micro_batch * train.seq_len, "interval": trace.interval,
           "untraced_ms": wall["untraced"], "traced_ms": wall["traced"],
           "traced_cpu_ms": cpu["traced"], "untraced_cpu_ms": cpu["untraced"],
           "overhead_per_traced_step_ms": wall["traced"] - wall["untraced"],
           "overhead_at_interval_percent": 100 * (wall["traced"] - wall["untraced"]) / trace.interval
           / wall["untraced"], "file_bytes": os.path.getsize(last)}
    print(json.dumps(row) if args.json else "\n".join(f"{k}: {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
