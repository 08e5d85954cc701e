#!/usr/bin/env python
"""Summaries and figures from a routing trace (docs/routing_trace.md).

    python tools/routing_trace.py summarize runs/tiny_cpu/trace --out runs/tiny_cpu/trace_report
    python tools/routing_trace.py summarize TRACE --out REPORT --config configs/tiny_cpu.yaml
    python tools/routing_trace.py compare TRACE_A TRACE_B --out REPORT

`summarize` writes summary.json (per MoE layer: expert load over the training steps, route
stability between consecutive evaluations, token-id and domain affinity per expert) and PNGs:
load_over_steps.png, stability.png (with evaluations in the trace), domain_affinity.png (with
domain labels), token_affinity.png. `compare` takes two traces of the same tokens (two checkpoints
through tools/evaluate.py --trace, or two routers) and writes compare.json (top-1 / top-k
agreement, weight and status differences per layer) and top1_confusion.png. --config or
--checkpoint: refuse a trace of another model than that one. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from moe_dist.checkpoint.files import CheckpointError
from moe_dist.common.atomic import staged_file, write_text_atomic
from moe_dist.common.config import ConfigError
from moe_dist.evaluate import trace_analysis as ta
from moe_dist.evaluate.trace_format import IDENTITY_FIELDS, check_identity, model_identity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="summary.json and figures of one trace")
    s.add_argument("trace", help="a trace directory (trace.dir of a run, or tools/evaluate.py --trace)")
    c = sub.add_parser("compare", help="the difference between two traces of the same tokens")
    c.add_argument("trace", help="the first trace directory")
    c.add_argument("other", help="the second trace directory")
    for q in (s, c):
        q.add_argument("--out", required=True, help="folder for the JSON and the PNGs (created)")
        q.add_argument("--config", default=None, help="training config YAML: refuse a trace of another model")
        q.add_argument("--checkpoint", default=None, help="checkpoint: refuse a trace of another model")
        q.add_argument("--phase", default="eval", choices=("train", "eval"),
                       help="compare: which forwards to compare (default eval)")
        q.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)


def _panels(n: int, width: float = 4.5, height: float = 3.2):
    return _plt().subplots(1, n, figsize=(width * n, height), squeeze=False)


def plot_load(load: dict, path: str) -> None:
    fig, axes = _panels(len(load))
    for ax, (layer, row) in zip(axes[0], load.items()):
        share = np.asarray(row["share"])
        for e in range(share.shape[1]):
            ax.plot(row["steps"], share[:, e], marker=".", label=f"expert {e}")
        ax.set_title(f"layer {layer}: share of routed pairs")
        ax.set_xlabel("step")
        ax.set_ylim(0, max(1e-6, float(share.max()) * 1.1))
    axes[0][0].legend(fontsize="small")
    _save(fig, path)


def plot_stability(stab: dict, path: str) -> None:
    fig, axes = _panels(len(stab))
    for ax, (layer, rows) in zip(axes[0], stab.items()):
        steps = [r["to_step"] for r in rows]
        ax.plot(steps, [r["top1_unchanged"] for r in rows], marker="o", label="top-1 unchanged")
        ax.plot(steps, [r["topk_set_unchanged"] for r in rows], marker="s", label="top-k set unchanged")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"layer {layer}: route stability")
        ax.set_xlabel("step (vs the previous evaluation)")
    axes[0][0].legend(fontsize="small")
    _save(fig, path)


def plot_domain(aff: dict, path: str) -> None:
    from moe_dist.evaluate.heatmap import draw_expert_by_domain

    layers = [(k, v["expert_domain_counts"]) for k, v in aff.items() if "expert_domain_counts" in v]
    fig, axes = _panels(len(layers))
    for ax, (layer, joint) in zip(axes[0], layers):
        draw_expert_by_domain(fig, ax, joint, [], layer)
    _save(fig, path)


def plot_tokens(trace: ta.Trace, path: str, count: int = 24) -> None:
    """P(expert | token id) for the most frequent token ids, per layer."""
    E = trace.num_experts
    vocab, freq = np.unique(trace.cols["token_id"], return_counts=True)
    top = vocab[np.argsort(-freq, kind="stable")[:count]]
    layers = sorted(set(trace.cols["layer"].tolist()))
    fig, axes = _panels(len(layers), width=5.5, height=0.6 + 0.25 * len(top))
    for ax, layer in zip(axes[0], layers):
        rows = trace.select(trace.cols["layer"] == layer)
        table = np.zeros((len(top), E))
        for i, tok in enumerate(top):
            table[i] = np.bincount(rows.experts[rows.cols["token_id"] == tok].reshape(-1), minlength=E)
        table /= np.maximum(table.sum(1, keepdims=True), 1)
        im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(top)), labels=[str(t) for t in top], fontsize="x-small")
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("token id")
        ax.set_title(f"layer {layer}: P(expert | token)")
        fig.colorbar(im, ax=ax)
    _save(fig, path)


def plot_confusion(diff: dict, path: str) -> None:
    fig, axes = _panels(len(diff), width=4.0, height=3.6)
    for ax, (layer, row) in zip(axes[0], diff.items()):
        conf = np.asarray(row["top1_confusion"], dtype=float)
        im = ax.imshow(conf / max(conf.sum(), 1), cmap="viridis")
        ax.set_xlabel("top-1 expert, second trace")
        ax.set_ylabel("top-1 expert, first trace")
        ax.set_title(f"layer {layer}: agreement {row['top1_agreement']:.3f}")
        fig.colorbar(im, ax=ax)
    _save(fig, path)


def expected_identity(args: argparse.Namespace) -> tuple[dict | None, str]:
    # Imported here: a checkpoint pulls in DeepSpeed, which a plain summary does not need.
    if args.config:
        from moe_dist.train.config import load_run_config

        return model_identity(load_run_config(args.config).model), f"--config {args.config}"
    if args.checkpoint:
        from moe_dist.checkpoint.consolidated import open_checkpoint

        return model_identity(open_checkpoint(args.checkpoint).model_cfg), f"--checkpoint {args.checkpoint}"
    return None, ""


def run(args: argparse.Namespace) -> dict:
    expected, expected_where = expected_identity(args)  # cheap checks before the reading

    def progress(items):
        return tqdm(items, desc=f"reading {len(items)} trace files", unit="file", disable=args.no_progress)

    traces = [ta.read_trace(args.trace, progress)]
    if args.command == "compare":
        traces.append(ta.read_trace(args.other, progress))
    for t in traces:
        if expected is not None:
            check_identity(t.meta, expected, t.where, expected_where)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "compare":
        a, b = (t.select(t.phase == args.phase) for t in traces)
        if not len(a.phase) or not len(b.phase):
            raise ConfigError(f"--phase {args.phase}: one of the traces has no {args.phase} rows")
        diff = ta.difference(a, b)
        summary = {"first": args.trace, "second": args.other, "phase": args.phase,
                   "routers": [a.meta.get("router"), b.meta.get("router")],
                   "layers": {str(k): v for k, v in diff.items()}}
        write_text_atomic(os.path.join(args.out, "compare.json"), json.dumps(summary, indent=1) + "\n")
        plot_confusion(diff, os.path.join(args.out, "top1_confusion.png"))
        return summary
    trace = traces[0]
    load = ta.expert_load(trace, "train")
    if not load:
        load = ta.expert_load(trace, "eval")
    stab = ta.stability_over_steps(trace, "eval")
    aff = ta.affinity(trace)
    summary = {"trace": args.trace, "model": {k: trace.meta.get(k) for k in IDENTITY_FIELDS},
               "rows": int(len(trace.phase)), "steps": {p: trace.steps(p) for p in ("train", "eval")},
               "expert_load": {str(k): v for k, v in load.items()},
               "stability": {str(k): v for k, v in stab.items()},
               "affinity": {str(k): v for k, v in aff.items()}}
    write_text_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    plot_load(load, os.path.join(args.out, "load_over_steps.png"))
    if stab:
        plot_stability(stab, os.path.join(args.out, "stability.png"))
    if any("expert_domain_counts" in v for v in aff.values()):
        plot_domain(aff, os.path.join(args.out, "domain_affinity.png"))
    plot_tokens(trace, os.path.join(args.out, "token_affinity.png"))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
