"""Peak memory of one forward+backward of an all-MoE model under each `model.moe_recompute` mode
(and with attention checkpointing), measured on CPU in a fresh child process per mode with
tools/bench/step_memory.py: peak tensor bytes (profiler allocation events) and peak RSS increase.

    python -m tools.bench.recompute                  # d 256, 4 layers all MoE, E 16 top-4, 8 x 256 tokens
    python -m tools.bench.recompute --top-k 8 --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import step_memory

MODES = [("off", "none"), ("off", "activation"), ("off", "experts"), ("on", "none"), ("on", "experts")]


def build_step(args: dict, ckpt: str, recompute: str):
    """One training forward+backward of the model; grads dropped at the end."""
    from moe_dist.model.config import parse_model_config
    from moe_dist.model.transformer import MoETransformer

    torch.set_num_threads(1)
    cfg = parse_model_config(
        dict(vocab_size=args["vocab"], d_model=args["d_model"], n_layers=args["layers"], n_heads=4,
             d_ff=args["d_ff"], max_seq_len=args["seq"], moe_every=1, moe_recompute=recompute,
             activation_checkpointing=ckpt == "on"),
        dict(num_experts=args["experts"], top_k=args["top_k"], d_ff=args["d_ff"], capacity_factor=1.25))
    model = MoETransformer(cfg, seed=0)
    tokens = torch.randint(0, args["vocab"], (args["batch"], args["seq"] + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m tools.bench.recompute",
                                description=__doc__.split("\n\n")[0])
    for name, default in (("d-model", 256), ("d-ff", 512), ("layers", 4), ("experts", 16), ("top-k", 4),
                          ("batch", 8), ("seq", 256), ("vocab", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    args = {"d_model": ns.d_model, "d_ff": ns.d_ff, "layers": ns.layers, "experts": ns.experts, "top_k": ns.top_k,
            "batch": ns.batch, "seq": ns.seq, "vocab": ns.vocab}
    step_memory.start_server(["torch", "moe_dist.model.transformer"])
    rows = []
    for ckpt, recompute in MODES:
        tensor_mb, rss_mb = step_memory.measure_peak_mb(build_step, (args, ckpt, recompute))
        rows.append({**args, "activation_checkpointing": ckpt, "moe_recompute": recompute,
                     "peak_tensor_mb": round(tensor_mb, 1),
                     "peak_rss_mb": None if rss_mb is None else round(rss_mb, 1)})
        print(f"ckpt {ckpt} moe_recompute {recompute}: {tensor_mb:.1f} MiB tensors, "
              f"{rows[-1]['peak_rss_mb']} MiB RSS", file=sys.stderr, flush=True)
    base = rows[0]["peak_tensor_mb"]
    for r in rows:
        r["over_none"] = round(r["peak_tensor_mb"] / base, 3)
    if ns.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print("| activation_checkpointing | moe_recompute | peak tensor MiB | / none | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['activation_checkpointing']} | {r['moe_recompute']} | {r['peak_tensor_mb']} | "
                  f"{r['over_none']:.2f} | {r['peak_rss_mb']} |")
    return rows


if __name__ == "__main__":
    main()
