"""What `inspect` prints: what a checkpoint holds, from its metadata and tensor shapes (no tensor
data is needed beyond what the model-states file already holds): layers, experts, the parallel
layout it was saved with, routers, dtypes, parameter counts (total and active per token), step,
config. The completeness of a training tag comes from `moe_dist.checkpoint.training.tag_report`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint, tensor_shapes
from moe_dist.checkpoint.training import TrainingCheckpoint, is_expert_key


def _shapes_and_dtypes(ckpt) -> tuple[dict[str, tuple[int, ...]], dict[str, str], set[str]]:
    """Global (ep_size=1) shape and dtype of every tensor, and the names of the buffers."""
    if isinstance(ckpt, ConsolidatedCheckpoint):
        shapes, dtypes = tensor_shapes(ckpt.weights_path)
        return shapes, dtypes, set(ckpt.meta.get("buffers", []))
    return ckpt.shapes_dtypes_and_buffers()


def summarize(ckpt: TrainingCheckpoint | ConsolidatedCheckpoint) -> dict[str, Any]:
    cfg = ckpt.model_cfg
    shapes, dtypes, buffers = _shapes_and_dtypes(ckpt)
    params = {n: math.prod(s) for n, s in shapes.items() if n not in buffers}
    expert = sum(n for name, n in params.items() if is_expert_key(name))
    moe = cfg.moe
    active = sum(params.values()) - expert + (expert * moe.top_k // moe.num_experts if moe else 0)
    out: dict[str, Any] = {
        "kind": "consolidated" if isinstance(ckpt, ConsolidatedCheckpoint) else "training",
        "path": ckpt.path if isinstance(ckpt, ConsolidatedCheckpoint) else ckpt.tag_dir,
        "step": ckpt.step,
        "layers": cfg.n_layers,
        "moe_layers": cfg.moe_layer_indices,
        "experts_per_layer": {i: moe.num_experts for i in cfg.moe_layer_indices},
        "top_k": moe.top_k if moe else None,
        "router_types": {i: cfg.moe_config(i).router.type for i in cfg.moe_layer_indices},
        "dtypes": sorted(set(dtypes.values())),
        "parameters_total": sum(params.values()),
        "parameters_active_per_token": active,
        "parameters_experts": expert,
        "config": ckpt.config,
    }
    if isinstance(ckpt, TrainingCheckpoint):
        out.update(ep_size=ckpt.ep_size, world_size=ckpt.world_size, zero_stage=ckpt.zero_stage, bf16=ckpt.bf16)
    else:
        out.update(weights=ckpt.meta.get("weights"), source=ckpt.meta.get("source"))
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['kind']} checkpoint {s['path']}", f"  step: {s['step']}"]
    report = s.get("tag_status")
    if report is not None:
        ok = "" if not report["problems"] else " -- NOT SOUND: " + "; ".join(report["problems"])
        lines.append(f"  tag: {report['tag']} ({report['status']}, run id {report['run_id']}){ok}")
        lines.append("  tags in the directory: " + ", ".join(f"{t} ({st})" for t, st in report["tags"].items()))
    if s["kind"] == "training":
        lines.append(f"  saved with: ep_size {s['ep_size']}, world size {s['world_size']}, ZeRO stage "
                     f"{s['zero_stage']}, bf16 {s['bf16']}")
    else:
        src = s.get("source") or {}
        if "hf_dir" in src:  # import-hf
            lines.append(f"  imported from: {src['hf_dir']} ({src.get('architecture')})")
        else:
            lines.append(f"  consolidated from: ep_size {src.get('ep_size')}, world size {src.get('world_size')} "
                         f"({s.get('weights')} weights)")
    lines += [
        f"  layers: {s['layers']} ({len(s['moe_layers'])} MoE: {s['moe_layers']})",
        f"  experts per MoE layer: {sorted(set(s['experts_per_layer'].values()))}, top_k {s['top_k']}",
        f"  routers: {sorted(set(s['router_types'].values()))}",
        f"  dtypes: {s['dtypes']}",
        f"  parameters: {s['parameters_total']:,} total, {s['parameters_active_per_token']:,} active per token "
        f"({s['parameters_experts']:,} in experts)",
        "  config:",
    ]
    lines += ["    " + line for line in yaml.safe_dump(s["config"], sort_keys=False).splitlines()]
    return "\n".join(lines)


def summary_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2, default=str)
