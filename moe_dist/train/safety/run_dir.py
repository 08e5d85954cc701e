"""The run's claim on its checkpoint directory, made in preflight by the job's first process
(global rank 0) before the process group exists: the lock (lock.py), the run id, the check
that the tag `--resume` will load is sound, and the removal of partial tags a crash left.

The run id is generated once per run and kept across `--resume` (read from the marker of the tag
`latest` names); the trainer hands it to every rank and writes it into every file of every tag.
"""

from __future__ import annotations

import atexit
import os
import uuid
from dataclasses import dataclass

from moe_dist.checkpoint.training import check_writable_dir, latest_run_id, remove_partial_tags, wait_for_deletions
from moe_dist.parallel import runtime
from moe_dist.train.safety import lock as run_lock


@dataclass
class RunDir:
    checkpoint_dir: str | None
    run_id: str
    lock: run_lock.RunLock | None = None

    def release(self) -> None:
        # The run's keep_last deletions (rank 0's background thread) end before its claim does.
        wait_for_deletions(why="the run is ending")
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def clean(self) -> None:
        """Remove partial tags (after the checks of the directory have passed)."""
        if self.checkpoint_dir:
            for tag in remove_partial_tags(self.checkpoint_dir):
                print(f"removed partial checkpoint {os.path.join(self.checkpoint_dir, tag)} (no completion "
                      f"marker: a save that did not finish)", flush=True)


def claim(checkpoint_dir: str | None, resume: bool, break_lock: bool = False) -> RunDir | None:
    """On global rank 0: the lock and the run id; None on the other ranks (they write nothing before
    rank 0 has passed preflight and joined the process group)."""
    if runtime.env_rank() != 0:
        return None
    # A file, or a folder this process cannot create files in, is refused here (exit 2) rather
    # than as a traceback from the lock's makedirs or, later, from the first save.
    check_writable_dir(checkpoint_dir)
    run_id = (latest_run_id(checkpoint_dir) if resume and checkpoint_dir else None) or uuid.uuid4().hex[:16]
    run = RunDir(checkpoint_dir=checkpoint_dir, run_id=run_id)
    if checkpoint_dir and (os.path.isdir(checkpoint_dir) or not resume):  # else the resume check fails next
        run.lock = run_lock.acquire(checkpoint_dir, run_id, break_lock)
        atexit.register(run.release)  # an exit that skips the trainer's `finally`
    return run
