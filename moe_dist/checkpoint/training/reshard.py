"""`reshard`: a training checkpoint -> the same checkpoint for another expert-parallel size (and
world size), which the trainer resumes from as if it had been written by a run of that shape.

Exact, not approximate: model weights are re-sliced, and the ZeRO-1/2 optimizer state (fp32
master weights and Adam moments, flat partitions per param group) is rebuilt whole by the reader
in `zero.py` and re-partitioned with DeepSpeed's layout rules (also `zero.py`) for the new world
size, expert groups over their new expert-data-parallel groups. The LR scheduler, step counters
and client state carry over; each rank's RNG state is copied for ranks that existed before (new
ranks start from the trainer's seed).

The param groups. moe_dist's trainer builds its optimizer groups as `optimizer_param_groups` does
(moe_dist/train/engine.py): dense groups, then DeepSpeed's
`split_params_into_different_moe_groups_for_optimizer` moves the expert parameters of each group
into a copy named `ep_size_<P>` with `moe: True` and cuts it into chunks of at most
`max_group_size` elements of *local* parameters. At another EP size the local sizes change, so
the chunks can too; dense groups never change. A resharded checkpoint must list exactly the
groups the resumed run will build, or DeepSpeed's load fails (`plan_groups`).

Memory: about six fp32 copies of the model (the rebuilt state and its new flat partitions).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils.tensor_fragment import fragment_address
from tqdm import tqdm

from moe_dist.checkpoint.files import CheckpointError, check_output, staged_directory
from moe_dist.checkpoint.training.layout import (CLIENT_KEY, ENGINE_PREFIX, LATEST, MODEL_STATES, experts_file,
                                                 rank_state_file, zero_file)
from moe_dist.checkpoint.training.reader import TrainingCheckpoint
from moe_dist.checkpoint.training.tags import write_marker
from moe_dist.checkpoint.training.zero import (BASE_STATE, FP32_PARTITIONS, OPTIMIZER_STATE, ZERO_STATE_ORDER,
                                               FlatGroupLayout, ZeroGroup, ZeroState, check_supported,
                                               param_alignment_for, parameter_alignment_paddings, partition_slot,
                                               read_zero_state)
from moe_dist.common.config import ConfigError
from moe_dist.parallel.groups import expert_group_name, validate_parallel_sizes

# ---- the new param groups ----------------------------------------------------------------------

@dataclass
class PlannedGroup:
    source: int  # the checkpoint group whose hyperparameters and unpartitioned state it takes
    hyper: dict[str, Any]
    names: list[str]
    is_moe: bool


def max_moe_group_size() -> int:
    """The chunk size the installed DeepSpeed splits expert groups at (its default argument)."""
    return inspect.signature(split_params_into_different_moe_groups_for_optimizer).parameters["max_group_size"].default


def _chunks(names: list[str], numel: Callable[[str], int], max_size: int) -> list[list[str]]:
    """DeepSpeed's greedy split; it can emit an empty first chunk, which the engine drops."""
    chunks, current, size = [], [], 0
    for name in names:
        n = numel(name)
        if size + n <= max_size:
            current.append(name)
            size += n
        else:
            chunks.append(current)
            current, size = [name], n
    if current:
        chunks.append(current)
    return [c for c in chunks if c]


def plan_groups(groups: list[ZeroGroup], local_numel: Callable[[str], int], ep_size: int,
                max_group_size: int | None = None) -> list[PlannedGroup]:
    """Groups for EP size `ep_size`, in the checkpoint's order. Consecutive expert groups with
    equal hyperparameters are the chunks of one split group (the trainer derives at most one
    expert group per dense group, and dense groups differ in weight decay) and are re-chunked
    together with the new local sizes (`max_group_size`: DeepSpeed's default unless given)."""
    max_group_size = max_group_size or max_moe_group_size()
    out: list[PlannedGroup] = []
    i = 0
    while i < len(groups):
        first = groups[i]
        if not first.is_moe:
            out.append(PlannedGroup(source=i, hyper=dict(first.hyper), names=list(first.names), is_moe=False))
            i += 1
            continue
        names, j = [], i
        while j < len(groups) and groups[j].is_moe and groups[j].hyper == first.hyper:
            names += groups[j].names
            j += 1
        hyper = {**first.hyper, "name": expert_group_name(ep_size)}
        for chunk in _chunks(names, local_numel, max_group_size):
            out.append(PlannedGroup(source=i, hyper=hyper, names=chunk, is_moe=True))
        i = j
    return out


def remap_per_group(state: dict[str, Any], n_old: int, sources: list[int]) -> dict[str, Any]:
    """An LR scheduler state with every per-group list (length `n_old`) re-indexed to the new
    groups: new group k takes old group `sources[k]`'s entry."""
    return {key: [value[s] for s in sources] if isinstance(value, list) and len(value) == n_old else value
            for key, value in state.items()}


# ---- the new files -----------------------------------------------------------------------------

@dataclass
class ReshardResult:
    out: str
    tag: str
    ep_size: int
    world_size: int
    notes: list[str] = field(default_factory=list)  # what the user must know to resume


@dataclass
class _Target:
    ep_size: int
    world_size: int
    expert_names: set[str]
    num_local: int

    def slot(self, is_moe: bool, rank: int) -> tuple[int, int, int]:
        return partition_slot(is_moe, rank, self.ep_size, self.world_size)

    def local(self, name: str, t: torch.Tensor, ep_rank: int) -> torch.Tensor:
        if name not in self.expert_names:
            return t
        return t[ep_rank * self.num_local:(ep_rank + 1) * self.num_local]


def _param_alignment(ckpt: TrainingCheckpoint) -> int:
    element_size = 2 if ckpt.bf16 else 4  # the bit16 (model) parameters' dtype
    return param_alignment_for(bool(ckpt.ds_config.get("zero_optimization", {}).get("parameter_alignment", False)),
                               element_size)


def _check_alignment_rule(ckpt: TrainingCheckpoint, zero: ZeroState, alignment: int) -> None:
    """The padding rule we will write with must reproduce the paddings DeepSpeed saved."""
    for i, group in enumerate(zero.groups):
        shapes = list(ckpt.main["param_shapes"][i].values())
        if parameter_alignment_paddings([math.prod(s) for s in shapes], alignment) != group.paddings:
            raise CheckpointError(f"the ZeRO files of {ckpt.tag_dir!r} record alignment paddings {group.paddings} for "
                                  f"param group {i}, which DeepSpeed 0.19.8's rule does not give; this layout cannot "
                                  f"be resharded")


def _layouts(plan: list[PlannedGroup], shapes: dict[str, tuple[int, ...]], target: _Target,
             alignment: int) -> list[FlatGroupLayout]:
    out = []
    for group in plan:
        group_shapes = [shapes[n] for n in group.names]
        out.append(FlatGroupLayout(
            names=tuple(group.names), shapes=tuple(group_shapes),
            paddings=tuple(parameter_alignment_paddings([math.prod(s) for s in group_shapes], alignment)),
            partition_count=target.slot(group.is_moe, 0)[2]))
    return out


def _flat_groups(zero: ZeroState, plan: list[PlannedGroup], layouts: list[FlatGroupLayout], target: _Target):
    """(group, EP rank) -> state key ("master", "exp_avg", ...) -> the new full flat tensor."""
    sources = {"master": zero.master, **zero.moments}
    flats: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for k, (group, layout) in enumerate(zip(plan, layouts)):
        for p in range(target.ep_size if group.is_moe else 1):
            flats[(k, p)] = {}
            for key, tensors in sources.items():
                local = {n: target.local(n, tensors[n], p) for n in group.names}
                flats[(k, p)][key] = layout.flatten(local, dtype=tensors[group.names[0]].dtype)
    return flats


def _zero_file_content(rank: int, zero: ZeroState, plan, layouts, flats, target: _Target,
                       ds_config: dict[str, Any]) -> dict[str, Any]:
    state, param_groups, fp32, paddings, slices = {}, [], [], [], []
    for k, (group, layout) in enumerate(zip(plan, layouts)):
        ep_rank, part, _ = target.slot(group.is_moe, rank)
        flat = flats[(k, ep_rank)]
        fp32.append(layout.partition(flat["master"], part, lean=True))
        state[k] = {key: copy.deepcopy(v) for key, v in zero.groups[group.source].scalars.items()}
        for key, t in flat.items():
            if key != "master":
                state[k][key] = layout.partition(t, part, lean=False)
        param_groups.append({**group.hyper, "params": [k]})
        paddings.append(layout.group_padding(part))
        slices.append(OrderedDict((ENGINE_PREFIX + n, a) for n, a in
                                  layout.slice_mappings(part, fragment_address).items()))
    per_rank = {BASE_STATE: {"state": state, "param_groups": param_groups},
                FP32_PARTITIONS: fp32,
                "group_paddings": paddings,
                "param_alignment_paddings": [list(layout.paddings) for layout in layouts],
                "partition_count": [layout.partition_count for layout in layouts],
                "param_slice_mappings": slices}
    fields = {**zero.global_fields, **per_rank}
    osd = {key: fields[key] for key in ZERO_STATE_ORDER}  # DeepSpeed's own order (state_dict())
    return {OPTIMIZER_STATE: osd, "ds_config": ds_config, "ds_version": zero.global_fields["ds_version"]}


def _model_states(ckpt: TrainingCheckpoint, module: dict[str, torch.Tensor], plan, layouts,
                  target: _Target) -> dict[str, Any]:
    main = dict(ckpt.main)
    bare = {key: key[len(ENGINE_PREFIX):] for key in ckpt.main["module"]}
    # clone: a saved slice would otherwise drag its whole global storage into the file
    main["module"] = OrderedDict((key, target.local(n, module[n], 0).clone()) for key, n in bare.items())
    main["param_shapes"] = [OrderedDict((ENGINE_PREFIX + n, tuple(s)) for n, s in zip(layout.names, layout.shapes))
                            for layout in layouts]
    main["dp_world_size"] = target.world_size
    if main.get("lr_scheduler") is not None:
        main["lr_scheduler"] = remap_per_group(main["lr_scheduler"], len(ckpt.main["param_shapes"]),
                                               [g.source for g in plan])
    client = copy.deepcopy(ckpt.client)
    if client["config"].get("moe"):
        client["config"]["moe"]["ep_size"] = target.ep_size
    client["world_size"] = target.world_size
    client["resharded_from"] = {"checkpoint": os.path.abspath(ckpt.tag_dir), "ep_size": ckpt.ep_size,
                                "world_size": ckpt.world_size}
    main[CLIENT_KEY] = client
    return main


def _resume_notes(ckpt: TrainingCheckpoint, target: _Target, out: str) -> list[str]:
    global_batch = int(ckpt.ds_config["train_batch_size"])
    steps = int((ckpt.config.get("train") or {}).get("steps") or 0)
    notes = [f"resume with {target.world_size} processes and --set moe.ep_size={target.ep_size} "
             f"--set train.checkpoint_dir={out} --resume"]
    if ckpt.step is not None and steps <= ckpt.step:
        # The run had finished: a resume with its own train.steps has nothing to do and is refused.
        notes[0] += f" --set train.steps=N (N above the checkpoint's step {ckpt.step}: the run ended there)"
    elif ckpt.step is not None:
        notes[0] += f" (continues step {ckpt.step + 1}..{steps}; raise train.steps to train longer)"
    if global_batch % target.world_size:
        notes.append(f"the global batch was {global_batch} sequences, not divisible by world size "
                     f"{target.world_size}: the trainer refuses to resume with another global batch")
    elif target.world_size != ckpt.world_size:
        notes.append(f"keep the global batch at {global_batch} sequences: train.micro_batch * train.grad_accum "
                     f"= {global_batch // target.world_size} at world size {target.world_size}")
    if target.world_size > ckpt.world_size:
        notes.append(f"ranks {ckpt.world_size}..{target.world_size - 1} have no saved RNG state and start "
                     f"from the trainer's seed (only router jitter and dropout-like noise use it)")
    return notes


def reshard(ckpt_path: str, out: str, *, ep_size: int, world_size: int | None = None, tag: str | None = None,
            overwrite: bool = False, progress: bool = True) -> ReshardResult:
    """Write `ckpt_path` resharded to `ep_size` (and `world_size`, default unchanged) as a
    checkpoint directory `out` (with `latest`); see the module docstring."""
    check_output(out, overwrite)
    ckpt = TrainingCheckpoint.open(ckpt_path, tag)
    check_supported(ckpt)
    world = world_size or ckpt.world_size
    moe = ckpt.model_cfg.moe
    try:
        if moe is None and ep_size != 1:
            raise ConfigError(f"the model has no MoE layers, so ep_size must be 1, got {ep_size}")
        validate_parallel_sizes(world, ep_size, moe.num_experts if moe else None)
    except ConfigError as e:
        raise CheckpointError(f"cannot reshard {ckpt.tag_dir!r} to ep_size {ep_size}, world size {world}: {e}") from None
    module = ckpt.module_state(progress)
    zero = read_zero_state(ckpt, progress)
    if zero.unknown_keys:
        raise CheckpointError(f"{zero_file(ckpt.tag_dir, 0, ckpt.bf16)!r} holds optimizer fields {zero.unknown_keys} "
                              f"this tool does not know how to repartition")
    alignment = _param_alignment(ckpt)
    _check_alignment_rule(ckpt, zero, alignment)
    target = _Target(ep_size=ep_size, world_size=world, expert_names=set(ckpt.expert_names()),
                     num_local=moe.num_experts // ep_size if moe else 0)
    shapes = {n: tuple(target.local(n, t, 0).shape) for n, t in module.items()}
    plan = plan_groups(zero.groups, lambda n: math.prod(shapes[n]), ep_size)
    layouts = _layouts(plan, shapes, target, alignment)
    flats = _flat_groups(zero, plan, layouts, target)
    tag = os.path.basename(os.path.normpath(ckpt.tag_dir))
    with staged_directory(out, overwrite) as tmp:
        tag_dir = os.path.join(tmp, tag)
        os.mkdir(tag_dir)
        torch.save(_model_states(ckpt, module, plan, layouts, target), os.path.join(tag_dir, MODEL_STATES))
        for p in range(ep_size if target.expert_names else 0):
            experts = {ENGINE_PREFIX + n: target.local(n, module[n], p).clone() for n in ckpt.expert_names()}
            torch.save({"ep_size": ep_size, "ep_rank": p, "run_id": ckpt.client.get("run_id"),  # tags.py
                        "experts": experts}, experts_file(tag_dir, p))
        for rank in tqdm(range(world), desc="new ZeRO partitions", unit="file", disable=not progress):
            torch.save(_zero_file_content(rank, zero, plan, layouts, flats, target, ckpt.ds_config),
                       zero_file(tag_dir, rank, ckpt.bf16))
        for rank in range(min(world, ckpt.world_size)):
            if os.path.isfile(rank_state_file(ckpt.tag_dir, rank)):
                shutil.copyfile(rank_state_file(ckpt.tag_dir, rank), rank_state_file(tag_dir, rank))
        # Complete, with the source run's id that every file above carries: `inspect` and
        # --resume check the resharded tag as they check the trainer's own.
        write_marker(tag_dir, ckpt.client.get("run_id"), ckpt.step)
        with open(os.path.join(tmp, LATEST), "w") as f:
            f.write(tag)
    return ReshardResult(out=out, tag=tag, ep_size=ep_size, world_size=world, notes=_resume_notes(ckpt, target, out))
