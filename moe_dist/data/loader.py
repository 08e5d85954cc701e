"""Deterministic, resumable, data-parallel batching of any dataset of samples
{"tokens": [S+1], "domain_ids": [S]} (the Megatron and the synthetic datasets alike).

Global batch g (counting from the dataset's first sample) is samples
[g * B * W, (g + 1) * B * W) for micro batch size B and W data-parallel ranks; rank r takes the
contiguous slice [r * B, (r + 1) * B) of it, as Megatron's pretraining sampler does. Resuming
after `consumed_samples` global samples continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

BATCH_KEYS = ("tokens", "domain_ids")


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's list of sample indices for each global batch after consumed_samples."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world_size: int = 1, consumed_samples: int = 0) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_world_size "
                             f"({dp_world_size}))")
        if not 0 <= consumed_samples <= num_samples:
            raise ValueError(f"consumed_samples ({consumed_samples}) must be in [0, num_samples "
                             f"({num_samples})]")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_batch_size = micro_batch_size * dp_world_size
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        # A last, incomplete global batch is dropped: every rank must run the same steps.
        return (self.num_samples - self.consumed_samples) // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(len(self)):
            start = (self.consumed_samples + step * self.global_batch_size
                     + self.dp_rank * self.micro_batch_size)
            yield list(range(start, start + self.micro_batch_size))


def collate_samples(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """-> {"tokens": int64 [B, S+1], "domain_ids": int64 [B, S]}; other keys are dropped."""
    return {key: torch.from_numpy(np.stack([np.asarray(s[key], dtype=np.int64) for s in samples]))
            for key in BATCH_KEYS}


def build_dataloader(dataset, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                     consumed_samples: int = 0,
                     num_workers: int = 0) -> torch.utils.data.DataLoader:
    """This rank's micro batches, from global sample `consumed_samples` on (see module doc)."""
    sampler = ShardedBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_world_size,
                                  consumed_samples)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_samples)
