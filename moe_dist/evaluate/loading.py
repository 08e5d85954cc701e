"""A model from a training or a consolidated checkpoint, ready for evaluation or generation.

Any checkpoint, at any EP size, is first made whole in memory (`full_state_dict`: the ep_size 1
state, experts stacked under global ids); a model of any EP size then takes its own rows of
every stacked expert tensor, as `load_consolidated` does from a file.

Eval-time capacity (docs/checkpoints.md, "Which function is the model"): `capacity="dropless"`
(the default of the tools) routes every token to its top-k experts, the function Hugging Face
exports and generation compute; `"config"` keeps the checkpoint's `moe.eval_capacity_factor`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from moe_dist.checkpoint.consolidated import ConsolidatedCheckpoint, full_state_dict, model_seed, open_checkpoint
from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.training import TrainingCheckpoint
from moe_dist.common.config import check_choice, from_dict
from moe_dist.data.config import TokenizerConfig
from moe_dist.data.tokenizers import build_tokenizer
from moe_dist.model.config import ModelConfig
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import ParallelGroups

CAPACITY_CHOICES = ("dropless", "config")


def checkpoint_tokenizer(config: dict[str, Any], model_override: str | None = None):
    """The tokenizer the run trained with (its `data.tokenizer` section); `model_override`
    replaces a SentencePiece model path that no longer exists here."""
    section = dict((config.get("data") or {}).get("tokenizer") or {"kind": "byte"})
    if model_override:
        section["model"] = model_override
    return build_tokenizer(from_dict(TokenizerConfig, section, "data.tokenizer"))


@dataclass
class LoadedModel:
    model: MoETransformer  # in eval mode
    config: dict[str, Any]  # the run config stored in the checkpoint (sections model, moe, data, ...)
    step: int | None
    path: str


def eval_model_config(cfg: ModelConfig, capacity: str, num_labels: int | None = None) -> ModelConfig:
    """`cfg` with the eval capacity chosen (`CAPACITY_CHOICES`) and, when given, `num_labels`
    (the number of domains of the eval data: statistics only, no weight depends on it)."""
    check_choice("capacity", capacity, CAPACITY_CHOICES)
    changes: dict[str, Any] = {}
    if num_labels is not None:
        changes["num_labels"] = num_labels
    if cfg.moe is not None and capacity == "dropless":
        changes["moe"] = dataclasses.replace(cfg.moe, eval_capacity_factor=0.0)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_state(model: MoETransformer, state: dict[str, torch.Tensor], where: str) -> None:
    """Load an ep_size 1 state dict into `model` (any EP size): dense tensors whole, this rank's
    rows [first_expert, first_expert + num_local) of every stacked expert tensor."""
    slices = {}
    for layer_index, moe in model.moe_layers():
        rows = slice(moe.first_expert, moe.first_expert + moe.cfg.num_local_experts)
        for name, _ in moe.experts.named_parameters():
            slices[f"blocks.{layer_index}.moe.experts.{name}"] = rows
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict({name: state[name][slices[name]] if name in slices else state[name]
                           for name in expected}, strict=True)


def load_model(path: str, *, tag: str | None = None, groups: ParallelGroups | None = None,
               capacity: str = "dropless", num_labels: int | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool = False) -> LoadedModel:
    """The checkpoint at `path` (a consolidated directory, or a training checkpoint directory
    with `tag` or its latest) as an eval-mode model over `groups` (default: one process)."""
    groups = groups or ParallelGroups.single()
    ckpt: TrainingCheckpoint | ConsolidatedCheckpoint = open_checkpoint(path, tag)
    cfg = eval_model_config(ckpt.model_cfg, capacity, num_labels)
    if cfg.moe is not None and cfg.moe.ep_size != groups.ep_size:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=groups.ep_size))
    state = full_state_dict(ckpt, progress=progress)
    model = MoETransformer(cfg, seed=model_seed(ckpt.config), groups=groups)
    load_state(model, state, repr(path))
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    return LoadedModel(model=model, config=ckpt.config, step=ckpt.step, path=path)
