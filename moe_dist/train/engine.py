"""The DeepSpeed engine around the model: MoE-aware optimizer groups, LR schedule, and the marker
that makes DeepSpeed treat the model as an MoE model.

DeepSpeed 0.19.8 decides whether a model "has MoE layers" by `isinstance(module,
deepspeed.moe.layer.MoE)` over `named_modules()` (engine `_configure_distributed_model`). Only
then does ZeRO-1/2 put expert parameter groups on the expert-data-parallel (EDP) group: partition
their optimizer state over it, reduce their gradients over it (divided by the full DP size), and
combine their norms correctly for clipping. Our `MoELayer` is not a DeepSpeed `MoE`, so a
parameter-free `DeepSpeedMoEMarker` (a subclass of it) is registered beside the model. Its state
dict is empty, so DeepSpeed's own per-expert checkpoint files stay empty; moe_dist saves expert
weights itself (`checkpoint.py`).
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import expert_group_name
from moe_dist.train.config import TrainSection
from moe_dist.train.schedule import build_lr_scheduler


class DeepSpeedMoEMarker(DeepSpeedMoE):
    """Tells DeepSpeed's engine that the model has MoE layers with `num_experts` experts over
    `ep_size` ranks. Holds no parameters and is never called."""

    def __init__(self, num_experts: int, ep_size: int) -> None:
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ would build a gate and experts
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = expert_group_name(ep_size)
        # 0: DeepSpeed's load path then looks for no per-expert files of its own.
        self.num_local_experts = 0

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups already exist (ParallelGroups.from_deepspeed) and the MoE layers hold them."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker is a marker for DeepSpeed's engine, not a layer")


class EngineModule(nn.Module):
    """What the engine wraps: the language model plus the marker (parameters: `model.*`)."""

    def __init__(self, model: MoETransformer) -> None:
        super().__init__()
        self.model = model
        moe = model.cfg.moe
        if moe is not None and model.cfg.moe_layer_indices:
            self.moe_marker = DeepSpeedMoEMarker(moe.num_experts, moe.ep_size)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def optimizer_param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on vectors (norm weights); then expert parameters split into
    their own groups, named by their EDP group, as ZeRO-1/2 requires (`moe: True`)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(module: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    return torch.optim.AdamW(optimizer_param_groups(module, train.weight_decay), lr=train.lr,
                             betas=tuple(train.adam_betas), eps=train.adam_eps)


def build_engine(model: MoETransformer, train: TrainSection, ds_config: dict[str, Any]):
    """-> (engine, optimizer, lr_scheduler). `ds_config` must already be reconciled."""
    module = EngineModule(model)
    optimizer = build_optimizer(module, train)
    scheduler = build_lr_scheduler(optimizer, train)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    if model.cfg.moe_layer_indices and not engine.has_moe_layers:
        raise RuntimeError("DeepSpeed did not detect the MoE marker; expert gradients would be "
                           "reduced over the wrong group")
    return engine, optimizer, scheduler
