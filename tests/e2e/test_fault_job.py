"""Preemption reaches every process of a job: DataLoader workers outlive the stop signals (the rank
decides and saves) (issue 26, item 2)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from moe_dist.data.loader import build_dataloader

class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        time.sleep(0.02)
        return {"tokens": [i] * 3, "domain_ids": [0] * 2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_dataloader_workers_outlive_a_stop_signal(sig):
    batches = iter(build_dataloader(_Slow(), 2, num_workers=2))
    first = next(batches)["tokens"][:, 0].tolist()
    workers = [w.pid for w in batches._workers]
    previous = signal.signal(sig, lambda *_: None)  # the rank's own handler: a stop request
    try:
        for pid in workers:
            os.kill(pid, sig)
        time.sleep(0.3)
        assert all(psutil.pid_exists(pid) for pid in workers)
        rest = [b["tokens"][:, 0].tolist() for b in batches]  # raised "DataLoader worker ... killed" before
    finally:
        signal.signal(sig, previous)
    assert first + sum(rest, []) == list(range(64))
