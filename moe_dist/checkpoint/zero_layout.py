"""Where each parameter lives in a ZeRO-1/2 flat parameter group (DeepSpeed 0.19.8,
`runtime/zero/stage_1_and_2.py`), as pure arithmetic: no process group, no optimizer.

For one optimizer param group with parameters p_0..p_{n-1} (in `param_shapes` order) and a
partition count P (the size of the group's data-parallel group: all ranks for dense groups, the
expert-data-parallel group for expert groups):

    flat = p_0 | pad_0 | p_1 | pad_1 | ... | p_{n-1} | tail      (pad_i: parameter alignment,
                                                                  0 unless parameter_alignment)
    len(flat) = ceil((sum numel + sum pad) / A) * A,  A = 2 * P  (nccl_start_alignment_factor 2)
    partition q = flat[q * S : (q + 1) * S],          S = len(flat) / P

Each rank saves its partition of the fp32 master weights without the tail (`group_paddings`
says how much was cut) and its optimizer state (Adam moments) with it, as flat tensors.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

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
