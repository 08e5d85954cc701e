"""`consolidate`: a training checkpoint (any EP size, any world size, ZeRO-1/2) -> one
world-size-independent state dict in the consolidated format (`consolidated.py`).

The weights are the module's (what the model computed with), or with `master_weights` the fp32
master copies rebuilt from the ZeRO partitions (what the optimizer holds; differs from the module
only under bf16). Buffers (router statistics, frozen projections) are never in the optimizer and
always come from the module.
"""

from __future__ import annotations

import os

import torch

from moe_dist.checkpoint.consolidated import single_rank_config, write_consolidated
from moe_dist.checkpoint.files import (
    SAFETENSORS,
    WEIGHT_FORMATS,
    CheckpointError,
    cast_floating,
    check_option,
    check_output,
    staged_directory,
    torch_dtype,
)
from moe_dist.checkpoint.layout import ENGINE_PREFIX
from moe_dist.checkpoint.training import TrainingCheckpoint
from moe_dist.checkpoint.zero import check_supported, read_zero_state


def model_state(ckpt: TrainingCheckpoint, master_weights: bool = False, progress: bool = True) -> dict[str, torch.Tensor]:
    """The ep_size=1 state dict of the checkpoint's model (module or fp32 master weights)."""
    state = ckpt.module_state(progress)
    if not master_weights:
        return state
    master = read_zero_state(ckpt, progress).master
    unknown = sorted(set(master) - set(state))
    if unknown:
        raise CheckpointError(f"the ZeRO files of {ckpt.tag_dir!r} hold parameters {unknown} that "
                              f"{ckpt.main_path!r} does not")
    return {name: master.get(name, t) for name, t in state.items()}


def consolidate(ckpt_path: str, out: str, *, tag: str | None = None, master_weights: bool = False,
                dtype: str | None = None, fmt: str = SAFETENSORS, overwrite: bool = False,
                progress: bool = True) -> str:
    """Write the consolidated checkpoint of `ckpt_path` to the directory `out`; returns `out`."""
    cast = torch_dtype(dtype)
    check_option("weight format", fmt, WEIGHT_FORMATS)
    check_output(out, overwrite)
    ckpt = TrainingCheckpoint.open(ckpt_path, tag)
    if master_weights:
        check_supported(ckpt)
    state = cast_floating(model_state(ckpt, master_weights, progress), cast)
    meta = {
        "config": single_rank_config(ckpt.config),
        "step": ckpt.step,
        "tokenizer": ckpt.client.get("tokenizer"),
        "weights": "master" if master_weights else "module",
        # Not parameters: counted apart by `inspect`, never in an optimizer.
        "buffers": sorted(n[len(ENGINE_PREFIX):] for n in ckpt.main.get("buffer_names", [])),
        "dtype": dtype or "as saved",
        "source": {"checkpoint": os.path.abspath(ckpt.tag_dir), "ep_size": ckpt.ep_size,
                   "world_size": ckpt.world_size, "zero_stage": ckpt.zero_stage, "bf16": ckpt.bf16},
    }
    with staged_directory(out, overwrite) as tmp:
        write_consolidated(tmp, state, meta, fmt)
    return out
