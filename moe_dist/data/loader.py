"""Deterministic, resumable, data-parallel batching of any dataset of samples
{"tokens": [S+1], "domain_ids": [S]} (the Megatron and the synthetic datasets alike).

Global batch g (counting from the dataset's first sample) is samples
[g * B * W, (g + 1) * B * W) for micro batch size B and W data-parallel ranks; rank r takes the
contiguous slice [r * B, (r + 1) * B) of it, as Megatron's pretraining sampler does. Resuming
after `consumed_samples` global samples continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch

BATCH_KEYS = ("tokens", "domain_ids")
# Collated when every sample of a batch has them (the Megatron datasets; not the synthetic ones):
# the padding mask and packed documents of the balance losses (MoESideInputs.valid_T, segment_ids_T).
OPTIONAL_BATCH_KEYS = ("loss_mask", "segment_ids")
# The stop signals of a run (moe_dist.train.safety.signals.SIGNALS). A Ctrl-C, a scheduler's
# SIGTERM to every process of the job, or launch.py's SIGTERM to its children's whole tree reaches
# the DataLoader workers too; a worker that dies of it makes the rank raise ("DataLoader worker
# (pid N) is killed by signal") before it can save. The workers ignore them and the rank decides;
# they still end with their rank (the DataLoader's shutdown, or its watch on the rank's pid).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
    """-> {"tokens": int64 [B, S+1], "domain_ids": int64 [B, S]}, and the OPTIONAL_BATCH_KEYS
    ([B, S]) that every sample has, `loss_mask` only where it masks a position (checked here, on
    the host's arrays, so that the trainer reads no tensor for it); other keys are dropped."""
    keys = BATCH_KEYS + tuple(key for key in OPTIONAL_BATCH_KEYS if all(key in s for s in samples))
    arrays = {key: np.stack([np.asarray(s[key], dtype=np.int64) for s in samples]) for key in keys}
    if "loss_mask" in arrays and arrays["loss_mask"].all():
        del arrays["loss_mask"]
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def _ignore_stop_signals(worker_id: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Blocked in the rank while it forked this worker (_WorkerSafeLoader): a signal that came
    # before the line above is pending here and now discarded, not fatal.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class _WorkerSafeLoader(torch.utils.data.DataLoader):
    """Forks its workers with the stop signals blocked, so none of them can die of one between the
    fork and `_ignore_stop_signals`; the rank gets any that came meanwhile once they are forked."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def build_dataloader(dataset, micro_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1,
                     consumed_samples: int = 0,
                     num_workers: int = 0) -> torch.utils.data.DataLoader:
    """This rank's micro batches, from global sample `consumed_samples` on (see module doc)."""
    sampler = ShardedBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_world_size,
                                  consumed_samples)
    return _WorkerSafeLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_samples,
                             worker_init_fn=_ignore_stop_signals if num_workers else None)
