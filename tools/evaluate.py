#!/usr/bin/env python
"""Loss and perplexity of a checkpoint on any data, per domain, with the eval's routing statistics.

    python tools/evaluate.py runs/tiny_cpu/checkpoints --data held_out.jsonl --label-key lang
    python tools/evaluate.py out/consolidated --data data/valid_text_document --tokens 1000000 --json
    python tools/evaluate.py runs/tiny_cpu/checkpoints --data configs/tiny_cpu.yaml --tokens 65536
    deepspeed --num_gpus 2 tools/evaluate.py runs/tiny_cpu/checkpoints --data held_out.txt

CHECKPOINT is a training checkpoint (its latest tag, or --tag) at any EP size, or a consolidated
directory. --data takes text files (.txt: one document per line, or --text-sample-by),
.jsonl/.json/.parquet (--text-key, optional --label-key for per-domain numbers) and Megatron
prefixes (PREFIX.bin/.idx, with the label sidecars preprocess_data.py writes), or a training
config (.yaml): the validation split of its data, e.g. the quickstart's synthetic domains, which
needs --tokens. Under the launcher
every rank evaluates its share and the sums are all-reduced: the same numbers as one process.
By default every token reaches its top-k experts (--capacity dropless), the function the
Hugging Face exports and tools/generate.py compute; --capacity config applies the checkpoint's
moe.eval_capacity_factor. --trace DIR writes the routing trace of the evaluation, --replay DIR
takes the routes of one (docs/routing_trace.md). Exit 2 on bad input (checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moe_dist.common.config import ConfigError
from moe_dist.common.quiet import quiet_library_notices

# The options are parsed before torch, DeepSpeed and Megatron-Core are imported (most of a start):
# --help and a bad option answer at once. Hence a copy of moe_dist.evaluate.loading.CAPACITY_CHOICES
# (eval_model_config checks the value again; tests/unit/tools/test_newcomer_tools.py compares them).
CAPACITY_CHOICES = ("dropless", "config")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="training checkpoint directory or consolidated directory")
    p.add_argument("--tag", default=None, help="tag of a training checkpoint (default: its latest)")
    p.add_argument("--data", nargs="+", required=True,
                   help="text/.jsonl/.json/.parquet files, Megatron prefixes, or one training config (.yaml)")
    p.add_argument("--text-key", default="text", help="column holding the text (json/parquet)")
    p.add_argument("--label-key", default=None, help="column holding the domain label (json/parquet)")
    p.add_argument("--text-sample-by", default="line", choices=("line", "paragraph", "document"),
                   help="what one document of a .txt file is")
    p.add_argument("--tokens", default="all", help="number of tokens to predict, or 'all' (default)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's train.seq_len)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward per rank")
    p.add_argument("--capacity", choices=CAPACITY_CHOICES, default="dropless",
                   help="eval-time capacity: dropless (default) or the checkpoint's eval_capacity_factor")
    p.add_argument("--ep-size", type=int, default=None,
                   help="expert-parallel size under the launcher (default: the world size if it divides the "
                        "experts, else 1)")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece model, if it moved since training")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the result as JSON to PATH (no PATH: to stdout, instead of the table)")
    p.add_argument("--heatmap", default=None, metavar="PNG",
                   help="write the expert-by-domain heatmaps (one panel per MoE layer) to this PNG")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="write the routing trace of every forward to DIR (docs/routing_trace.md)")
    p.add_argument("--trace-tokens", default="all",
                   help="traced tokens per forward and MoE layer, or 'all' (default)")
    p.add_argument("--trace-max-mb", type=float, default=1024.0,
                   help="per rank: the trace file's bound in MiB (rows past it are left out)")
    p.add_argument("--replay", default=None, metavar="TRACE_DIR",
                   help="take the routes of this trace (an evaluation trace of the same data, batch and world size)")
    p.add_argument("--replay-weights", action="store_true", help="with --replay: its combine weights too")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def parse_budget(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--tokens must be a positive number of tokens or 'all', got {text!r}")
    return value


def default_ep_size(world: int, num_experts: int | None) -> int:
    return world if num_experts and num_experts % world == 0 else 1


def parse_trace_tokens(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--trace-tokens must be a positive number of tokens or 'all', got {text!r}")
    return int(text)


def default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def format_table(result, header: str) -> str:
    lines = [header, (f"tokens {result.tokens:,} in {result.windows:,} windows | loss {result.loss:.4f} "
                      f"± {result.loss_sem:.4f} (standard error) | perplexity {result.perplexity:.3f}")]
    if len(result.domains) > 1 or result.domain_names:
        lines.append(f"{'domain':<24}{'tokens':>12}{'loss':>10}{'perplexity':>12}")
        for name, d in result.domains.items():
            lines.append(f"{name:<24}{d['tokens']:>12,}{d['loss']:>10.4f}{d['perplexity']:>12.3f}")
    for layer, row in result.moe_layers.items():
        mi = f" | I(expert; domain)/H(domain) {row['mi_domain_normalized']:.3f}" if "mi_domain" in row else ""
        lines.append(f"MoE layer {layer}: dropped {row['dropped_fraction']:.4f} | load CV {row['load_cv']:.3f} | "
                     f"max/mean {row['load_max_over_mean']:.2f}{mi}")
    return "\n".join(lines)


def write_heatmap(path: str, result) -> None:
    """P(expert | domain) per MoE layer, columns summing to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from moe_dist.common.atomic import staged_file
    from moe_dist.evaluate.heatmap import draw_expert_by_domain

    layers = [(k, np.array(v["expert_domain_counts"], dtype=float)) for k, v in result.moe_layers.items()
              if "expert_domain_counts" in v]
    if not layers:
        raise ConfigError("--heatmap needs domain labels (--label-key, or prefixes with label sidecars)")
    E, L = layers[0][1].shape
    fig, axes = plt.subplots(1, len(layers), figsize=(1.5 + (1.2 + 0.6 * L) * len(layers), 1.5 + 0.3 * E),
                             squeeze=False)
    for ax, (layer, joint) in zip(axes[0], layers):
        draw_expert_by_domain(fig, ax, joint, result.domain_names, layer)
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run(args: argparse.Namespace):
    from moe_dist.checkpoint.consolidated import open_checkpoint
    from moe_dist.evaluate import sources
    from moe_dist.evaluate.loading import checkpoint_tokenizer, load_model
    from moe_dist.evaluate.runner import evaluate
    from moe_dist.evaluate.trace_format import model_identity
    from moe_dist.evaluate.trace_replay import RouteReplay
    from moe_dist.evaluate.trace_writer import TraceWriter, trace_meta
    from moe_dist.parallel import runtime
    from moe_dist.parallel.groups import ParallelGroups

    budget = parse_budget(args.tokens)
    trace_tokens = parse_trace_tokens(args.trace_tokens)
    if args.replay_weights and not args.replay:
        raise ConfigError("--replay-weights needs --replay TRACE_DIR")
    if args.trace_max_mb <= 0:
        raise ConfigError(f"--trace-max-mb must be > 0, got {args.trace_max_mb}")
    sources.check_sources(args.data)
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    ckpt = open_checkpoint(args.checkpoint, args.tag)  # cheap checks first: config, files present
    cfg = ckpt.model_cfg
    seq_len = args.seq_len or (ckpt.config.get("train") or {}).get("seq_len") or cfg.max_seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ConfigError(f"--seq-len ({seq_len}) must be in [1, model.max_seq_len ({cfg.max_seq_len})]")
    if (args.trace or args.replay) and cfg.moe is None:
        raise ConfigError(f"--trace / --replay need a model with MoE layers; {args.checkpoint} has none")
    tokenizer = checkpoint_tokenizer(ckpt.config, args.tokenizer_model)
    sources.check_tokenizer(args.data, tokenizer, f"checkpoint {args.checkpoint!r}'s")
    if sources.is_run_config(args.data[0]):
        if budget is None:
            raise ConfigError(f"--data {args.data[0]} (a run's validation split) needs a --tokens budget")
        names, windows = sources.run_split_windows(args.data[0], cfg.vocab_size, seq_len, budget)
    else:
        names = sources.domain_names(args.data, args.label_key)
        docs = sources.documents(args.data, tokenizer, names, text_key=args.text_key, label_key=args.label_key,
                                 text_sample_by=args.text_sample_by)
        windows = sources.windows(docs, seq_len, budget)

    identity = model_identity(cfg)
    replay = None
    if args.replay:  # before the model loads: a trace of another model is refused here
        replay = RouteReplay(args.replay, identity, rank=runtime.env_rank(), world_size=runtime.env_world_size(),
                             with_weights=args.replay_weights, where="--replay")
    if runtime.env_world_size() > 1:
        runtime.init_distributed()
    world = runtime.world_size()
    num_experts = cfg.moe.num_experts if cfg.moe else None
    ep_size = args.ep_size or default_ep_size(world, num_experts)
    groups = ParallelGroups.build(ep_size, num_experts) if world > 1 else ParallelGroups.single()
    loaded = load_model(args.checkpoint, tag=args.tag, groups=groups, capacity=args.capacity,
                        num_labels=len(names), device=default_device(),
                        progress=not args.no_progress and runtime.rank() == 0)
    trace = None
    if args.trace:
        meta = trace_meta(identity, source="evaluate", world_size=world, ep_size=ep_size, batch=args.batch,
                          seq_len=seq_len, capacity=args.capacity, checkpoint=os.path.abspath(args.checkpoint))
        max_bytes = int(args.trace_max_mb * 2**20)
        trace = TraceWriter(args.trace, meta, rank=runtime.rank(), top_k=cfg.moe.top_k, tokens=trace_tokens,
                            eod=tokenizer.eod, max_file_bytes=max_bytes, max_total_bytes=max_bytes)
    return evaluate(loaded.model, windows, names, batch=args.batch,
                    groups=groups, progress=not args.no_progress, total_tokens=budget, trace=trace, replay=replay,
                    step=loaded.step or 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_notices()
    import torch

    from moe_dist.checkpoint.files import CheckpointError
    from moe_dist.parallel import runtime

    try:
        with torch.no_grad():
            result = run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as e:
        # Under the launcher every process checks the same input: the first of each node says so.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if runtime.rank() == 0:
        if args.json == "-":
            print(json.dumps(result.to_json(), indent=1))
        else:
            print(format_table(result, f"{args.checkpoint} on {', '.join(args.data)}"))
            if args.json:
                from moe_dist.common.atomic import write_text_atomic

                write_text_atomic(args.json, json.dumps(result.to_json(), indent=1) + "\n")
        if args.heatmap:
            write_heatmap(args.heatmap, result)
    runtime.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
