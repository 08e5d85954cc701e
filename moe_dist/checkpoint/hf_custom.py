"""moe_dist -> a Hugging Face directory with its own modeling code (`auto_map` in config.json),
for everything Mixtral cannot express. Loads with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` without moe_dist installed.

The modeling file (`hf_remote_code/modeling_moe_dist.py`) mirrors `MoETransformer` module for
module, so the mapping is the identity plus a prefix: moe_dist's ep_size=1 tensor `<name>` is
`model.<name>` (router statistics buffers included), and config.json carries moe_dist's `model`
and `moe` sections as `moe_dist_model` / `moe_dist_moe`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import Tensor

from moe_dist.checkpoint import hf_remote_code
from moe_dist.common.config import to_dict
from moe_dist.model.config import ModelConfig

CONFIG_MODULE, MODELING_MODULE = "configuration_moe_dist", "modeling_moe_dist"


def custom_config(cfg: ModelConfig, token_ids: dict[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    model = to_dict(cfg)
    moe = model.pop("moe")
    return {
        "architectures": ["MoEDistForCausalLM"],
        "model_type": "moe_dist",
        "auto_map": {"AutoConfig": f"{CONFIG_MODULE}.MoEDistConfig",
                     "AutoModelForCausalLM": f"{MODELING_MODULE}.MoEDistForCausalLM"},
        "moe_dist_model": model,
        "moe_dist_moe": moe,
        # No KV cache in the exported model: generation must recompute the sequence.
        "use_cache": False,
        "dtype": str(dtype).replace("torch.", ""),
        **token_ids,
    }


def custom_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"model.{name}": t for name, t in state.items()}


def copy_modeling_files(out_dir: str) -> None:
    src = os.path.dirname(hf_remote_code.__file__)
    for module in (CONFIG_MODULE, MODELING_MODULE):
        shutil.copyfile(os.path.join(src, f"{module}.py"), os.path.join(out_dir, f"{module}.py"))
