"""DeepSpeed's ZeRO-1/2 optimizer partitions with expert parallelism: where each parameter lives
in a flat parameter group (`runtime/zero/stage_1_and_2.py`, as pure arithmetic: no process
group, no optimizer), and our own reader of the partition files, which rebuilds the fp32 master
weights and the optimizer state (Adam moments) of every parameter whole, experts stacked under
global ids. DeepSpeed's zero_to_fp32 assumes every group is partitioned over all ranks and so
cannot do this for expert groups.

The flat layout. For one optimizer param group with parameters p_0..p_{n-1} (in `param_shapes`
order) and a partition count P (the size of the group's data-parallel group: all ranks for dense
groups, the expert-data-parallel group for expert groups):

    flat = p_0 | pad_0 | p_1 | pad_1 | ... | p_{n-1} | tail      (pad_i: parameter alignment,
                                                                  0 unless parameter_alignment)
    len(flat) = ceil((sum numel + sum pad) / A) * A,  A = 2 * P  (nccl_start_alignment_factor 2)
    partition q = flat[q * S : (q + 1) * S],          S = len(flat) / P

Each rank saves its partition of the fp32 master weights without the tail (`group_paddings`
says how much was cut) and its optimizer state (Adam moments) with it, as flat tensors.

Which file holds what (W ranks, expert-parallel size P):
- dense group i: partition q is in `zero_pp_rank_q`, q = 0..W-1;
- expert group i (`moe: True`, named `ep_size_P`): partitioned over the expert-data-parallel
  group of each EP rank p, the ranks {p, p+P, p+2P, ...} (DeepSpeed's default layout, the one
  moe_dist uses); partition q of EP rank p is in `zero_pp_rank_{q*P + p}`. Its parameters are
  that EP rank's local experts [E/P, ...].

Supported: the "rigid" files of the stage-1/2 optimizer of the DeepSpeed releases in
`DEEPSPEED_VERSIONS` (fp32; bf16 at ZeRO-2 with fp32 or bf16 gradient accumulation, the files are
the same; bf16 at ZeRO-1 with bf16 accumulation); a checkpoint whose
model-states file records another `ds_version` is refused. Not supported, with an error saying
so: elastic_checkpoint, round-robin gradients, data-before-expert parallel groups, and the
BF16_Optimizer's format (bf16 + ZeRO-1 + fp32 gradient accumulation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import Tensor
from tqdm import tqdm

from moe_dist.checkpoint.files import CheckpointError, load_pt, require_keys
from moe_dist.checkpoint.training.layout import strip_engine_prefix, zero_file
from moe_dist.checkpoint.training.reader import TrainingCheckpoint
from moe_dist.parallel.groups import expert_group_name

# The DeepSpeed releases whose stage-1/2 files this module was verified against (diffing their
# stage_1_and_2.py, engine.py, moe/utils.py and utils/groups.py with 0.19.8's, and running
# tests/distributed/test_checkpoint_roundtrip.py under each; docs/checkpoints.md): the same flat layout, alignment
# paddings, file names and optimizer_state_dict keys. 0.19.0-0.19.6 do not record
# param_alignment_paddings. pyproject.toml pins deepspeed to this range.
DEEPSPEED_VERSIONS = ("0.19.7", "0.19.8")


# ---- the flat layout ---------------------------------------------------------------------------

NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: 4-byte alignment / sizeof(fp16)


def parameter_alignment_paddings(numels: list[int], param_alignment: int) -> list[int]:
    """DeepSpeed's padding after each parameter: the next one starts at a multiple of
    `param_alignment` (1 unless zero_optimization.parameter_alignment); none after the last."""
    paddings, offset = [], 0
    for i, n in enumerate(numels):
        offset += n
        pad = 0 if i == len(numels) - 1 else (-offset) % param_alignment
        paddings.append(pad)
        offset += pad
    return paddings


def param_alignment_for(parameter_alignment: bool, element_size: int) -> int:
    return 16 // math.gcd(16, element_size) if parameter_alignment else 1


def partition_slot(is_moe: bool, rank: int, ep_size: int, world: int) -> tuple[int, int, int]:
    """Which partition of a param group rank `rank`'s file holds: (EP rank whose tensors the
    partition holds, partition index, partition count). A dense group is partitioned over all
    ranks; an expert group over the expert-data-parallel group of EP rank `rank % ep_size`."""
    if is_moe:
        return rank % ep_size, rank // ep_size, world // ep_size
    return 0, rank, world


@dataclass(frozen=True)
class FlatGroupLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    paddings: tuple[int, ...]
    partition_count: int

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out, offset = [], 0
        for n, pad in zip(self.numels, self.paddings):
            out.append(offset)
            offset += n + pad
        return out

    @property
    def data_numel(self) -> int:
        """Parameters plus their alignment paddings: the flat group without its tail."""
        return sum(self.numels) + sum(self.paddings)

    @property
    def flat_numel(self) -> int:
        alignment = NCCL_START_ALIGNMENT_FACTOR * self.partition_count
        return math.ceil(self.data_numel / alignment) * alignment

    @property
    def partition_size(self) -> int:
        return self.flat_numel // self.partition_count

    def group_padding(self, partition: int) -> int:
        """How much of `partition` is tail (DeepSpeed's `groups_padding` on that rank)."""
        start = partition * self.partition_size
        return self.partition_size - min(self.partition_size, max(0, self.data_numel - start))

    def flatten(self, tensors_by_name: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        flat = torch.zeros(self.flat_numel, dtype=dtype)
        for name, offset, n in zip(self.names, self.offsets, self.numels):
            flat[offset:offset + n] = tensors_by_name[name].reshape(-1)
        return flat

    def partition(self, flat: Tensor, partition: int, lean: bool) -> Tensor:
        """Partition `partition` of a full flat tensor; `lean` cuts its tail (as master weights
        are saved), otherwise it keeps the full partition size (as optimizer state is)."""
        start = partition * self.partition_size
        size = self.partition_size - (self.group_padding(partition) if lean else 0)
        return flat[start:start + size].clone()

    def unflatten(self, lean_flat: Tensor) -> dict[str, Tensor]:
        """Parameters from the concatenated lean partitions (length `data_numel`)."""
        if lean_flat.numel() != self.data_numel:
            raise ValueError(f"the lean partitions hold {lean_flat.numel()} elements, the parameters "
                             f"{list(self.names)} and their paddings need {self.data_numel}")
        return {name: lean_flat[offset:offset + math.prod(shape)].view(shape)
                for name, shape, offset in zip(self.names, self.shapes, self.offsets)}

    def slice_mappings(self, partition: int, fragment_address) -> OrderedDict:
        """DeepSpeed's `param_slice_mappings` entry for `partition`: the part of each parameter
        inside it, as `fragment_address(start within the partition, numel)`."""
        lo = partition * self.partition_size
        hi = lo + self.partition_size
        out = OrderedDict()
        for name, offset, n in zip(self.names, self.offsets, self.numels):
            start, end = max(offset, lo), min(offset + n, hi)
            if start < end:
                out[name] = fragment_address(start=start - lo, numel=end - start)
        return out


# ---- the partition files -----------------------------------------------------------------------

OPTIMIZER_STATE = "optimizer_state_dict"
BASE_STATE = "base_optimizer_state"
FP32_PARTITIONS = "single_partition_of_fp32_groups"
# The optimizer_state_dict of DeepSpeed's stage-1/2 optimizer (DEEPSPEED_VERSIONS), in its order.
ZERO_STATE_ORDER = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", BASE_STATE, FP32_PARTITIONS,
                    "zero_stage", "group_paddings", "param_alignment_paddings", "partition_count", "ds_version",
                    "param_slice_mappings")
# Keys that are the same on every rank; a resharded file copies them from rank 0's.
GLOBAL_KEYS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "ds_version")


@dataclass
class ZeroGroup:
    hyper: dict[str, Any]  # the optimizer param group without 'params' (lr, weight_decay, name, moe)
    names: list[str]  # bare parameter names, in flat order
    scalars: dict[str, Any]  # unpartitioned optimizer state of the group (Adam's 'step')
    paddings: list[int]  # parameter-alignment paddings as saved

    @property
    def is_moe(self) -> bool:
        return bool(self.hyper.get("moe", False))


@dataclass
class ZeroState:
    groups: list[ZeroGroup]
    master: dict[str, Tensor]  # fp32 master weight of every optimized parameter (bare names)
    moments: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # state key -> name -> tensor
    global_fields: dict[str, Any] = field(default_factory=dict)  # GLOBAL_KEYS from rank 0's file
    # Keys of rank 0's optimizer_state_dict this reader does not know (a newer DeepSpeed wrote
    # them); harmless for reading weights, fatal for writing files that DeepSpeed will load.
    unknown_keys: list[str] = field(default_factory=list)


def check_deepspeed_version(ckpt: TrainingCheckpoint) -> None:
    """The DeepSpeed that wrote the checkpoint (its `ds_version`) must be one whose partition
    layout this reader knows."""
    recorded = ckpt.main.get("ds_version")
    try:
        release = Version(str(recorded)).base_version  # "0.19.8+cu124" is 0.19.8
    except InvalidVersion:
        release = None
    if release not in DEEPSPEED_VERSIONS:
        raise CheckpointError(f"{ckpt.main_path!r} was written by DeepSpeed {recorded!r} (its ds_version); the ZeRO "
                              f"optimizer partitions can be read for DeepSpeed {', '.join(DEEPSPEED_VERSIONS)} only, "
                              f"the versions whose stage-1/2 layout was verified (docs/checkpoints.md)")


def check_supported(ckpt: TrainingCheckpoint) -> None:
    check_deepspeed_version(ckpt)
    ds = ckpt.ds_config
    zero = ds.get("zero_optimization", {})
    where = f"{ckpt.main_path!r} (ds_config)"
    if ckpt.zero_stage not in (1, 2):
        raise CheckpointError(f"{where}: zero_optimization.stage is {ckpt.zero_stage}; optimizer partitions "
                              f"can be read for ZeRO stages 1 and 2 only")
    for key in ("elastic_checkpoint", "round_robin_gradients"):
        if zero.get(key, False):
            raise CheckpointError(f"{where}: zero_optimization.{key} is true; this layout is not supported")
    if ds.get("use_data_before_expert_parallelism", False):
        raise CheckpointError(f"{where}: use_data_before_expert_parallelism is true; moe_dist's expert "
                              f"groups use DeepSpeed's default layout")


def _layout(ckpt: TrainingCheckpoint, i: int, paddings: list[int], count: int) -> FlatGroupLayout:
    shapes = ckpt.main["param_shapes"][i]
    names = [strip_engine_prefix(n, ckpt.main_path) for n in shapes]
    if len(paddings) != len(names):
        raise CheckpointError(f"{ckpt.main_path!r}: param group {i} has {len(names)} parameters but the ZeRO "
                              f"files record {len(paddings)} alignment paddings")
    return FlatGroupLayout(names=tuple(names), shapes=tuple(tuple(s) for s in shapes.values()),
                           paddings=tuple(paddings), partition_count=count)


def _rank_file(ckpt: TrainingCheckpoint, rank: int) -> tuple[str, dict[str, Any]]:
    path = zero_file(ckpt.tag_dir, rank, ckpt.bf16)
    saved = load_pt(path, f"ZeRO optimizer partition (rank {rank} of {ckpt.world_size})", deepspeed=True)
    require_keys(saved, (OPTIMIZER_STATE,), path, "ZeRO optimizer partition")
    osd = saved[OPTIMIZER_STATE]
    require_keys(osd, ZERO_STATE_ORDER, path,
                 "ZeRO optimizer partition (DeepSpeed stage-1/2 format; the BF16_Optimizer format is not supported)")
    if not isinstance(osd[BASE_STATE], dict):
        raise CheckpointError(f"{path!r}: base_optimizer_state is a {type(osd[BASE_STATE]).__name__}; only "
                              f"non-elastic ZeRO checkpoints are supported")
    n_groups = len(ckpt.main["param_shapes"])
    if len(osd[FP32_PARTITIONS]) != n_groups or len(osd[BASE_STATE]["param_groups"]) != n_groups:
        raise CheckpointError(f"{path!r} holds {len(osd[FP32_PARTITIONS])} parameter groups, but "
                              f"{ckpt.main_path!r} lists {n_groups}")
    return path, osd


def read_zero_state(ckpt: TrainingCheckpoint, progress: bool = True) -> ZeroState:
    """Read every rank's partition file and rebuild whole parameters (see module docstring)."""
    check_supported(ckpt)
    W, P = ckpt.world_size, ckpt.ep_size
    n_groups = len(ckpt.main["param_shapes"])
    layouts: list[FlatGroupLayout | None] = [None] * n_groups
    groups: list[ZeroGroup | None] = [None] * n_groups
    # (group, EP rank) -> partition index -> {"master" | state key: lean partition}
    pieces: dict[tuple[int, int], dict[int, dict[str, Tensor]]] = {}
    global_fields: dict[str, Any] = {}
    unknown_keys: list[str] = []
    for rank in tqdm(range(W), desc="ZeRO partitions", unit="file", disable=not progress):
        path, osd = _rank_file(ckpt, rank)
        if rank == 0:
            global_fields = {k: osd[k] for k in GLOBAL_KEYS}
            unknown_keys = sorted(set(osd) - set(ZERO_STATE_ORDER))
        for i in range(n_groups):
            hyper = {k: v for k, v in osd[BASE_STATE]["param_groups"][i].items() if k != "params"}
            is_moe = bool(hyper.get("moe", False))
            if is_moe and hyper.get("name") != expert_group_name(P):
                raise CheckpointError(f"{path!r}: expert param group {i} is named {hyper.get('name')!r}, expected "
                                      f"{expert_group_name(P)!r} (the config's moe.ep_size {P})")
            ep_rank, part, count = partition_slot(is_moe, rank, P, W)
            if osd["partition_count"][i] != count:
                raise CheckpointError(f"{path!r}: param group {i} ({hyper.get('name')!r}) is split into "
                                      f"{osd['partition_count'][i]} partitions, expected {count} (world size {W}, "
                                      f"ep_size {P})")
            if layouts[i] is None:
                layouts[i] = _layout(ckpt, i, list(osd["param_alignment_paddings"][i]), count)
            layout = layouts[i]
            lean = layout.partition_size - layout.group_padding(part)
            master = osd[FP32_PARTITIONS][i]
            if master.numel() != lean:
                raise CheckpointError(f"{path!r}: the fp32 partition of param group {i} has {master.numel()} "
                                      f"elements, expected {lean} for the parameters listed in {ckpt.main_path!r}")
            entry = {"master": master.float()}
            scalars = {}
            for key, value in osd[BASE_STATE]["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if value.numel() != layout.partition_size:
                        raise CheckpointError(f"{path!r}: optimizer state {key!r} of param group {i} has "
                                              f"{value.numel()} elements, expected {layout.partition_size}")
                    entry[key] = value[:lean]
                else:
                    scalars[key] = value
            pieces.setdefault((i, ep_rank), {})[part] = entry
            if groups[i] is None:
                groups[i] = ZeroGroup(hyper=hyper, names=list(layout.names), scalars=scalars,
                                      paddings=list(layout.paddings))
    state = _assemble(ckpt, layouts, groups, pieces)
    state.global_fields, state.unknown_keys = global_fields, unknown_keys
    return state


def _assemble(ckpt, layouts, groups, pieces) -> ZeroState:
    per_key: dict[str, dict[str, Tensor]] = {}
    for i, (layout, group) in enumerate(zip(layouts, groups)):
        ep_ranks = range(ckpt.ep_size) if group.is_moe else range(1)
        local: dict[str, dict[str, list[Tensor]]] = {}  # state key -> name -> per EP rank
        for p in ep_ranks:
            parts = pieces[(i, p)]
            for key in parts[0]:
                flat = torch.cat([parts[q][key] for q in range(layout.partition_count)])
                for name, t in layout.unflatten(flat).items():
                    local.setdefault(key, {}).setdefault(name, []).append(t)
        for key, by_name in local.items():
            for name, shards in by_name.items():
                per_key.setdefault(key, {})[name] = torch.cat(shards, dim=0) if group.is_moe else shards[0]
    master = per_key.pop("master")
    return ZeroState(groups=groups, master=master, moments=per_key)
