"""Why a run ends early, and the exit status `launch/pretrain.py` returns for each (docs/launch.md).

    0   finished (train.steps or --stop_at_step reached)
    1   any other error (a traceback; a collective timeout is one)
    2   configuration error (a ConfigError), before any process group exists; the few that only
        building the model or the data finds (a router setting that does not fit model.d_model,
        moe.expert_impl 'mkl' without MKL, label sidecars that disagree with their data) after
    3   stopped: train.max_consecutive_skips non-finite steps in a row, or weights not finite at a
        save (nothing committed; `latest` stays on the last good checkpoint). Do not requeue as is.
    4   the watchdog: no step completed within train.watchdog_timeout (stacks on stderr)
    5   stopped under `moe.overflow: error`: a rank was sent more rows than its receive budget
        (moe/rank_budget.py; one line per rank naming the layer, the ranks and the hottest expert).
        Every rank stops in the same forward, nothing is saved. Requeuing as is fails again: raise
        moe.rank_capacity_factor or choose `drop` / `spill`.
    28  the disk filled during a checkpoint save (ENOSPC's number; moe_dist/checkpoint/training/disk.py)
    30  the checkpoint folder became unwritable during a save: read-only filesystem or no permission
        (EROFS's number); freeing space does not help. At start-up the same is a refusal, exit 2
    75  stopped by SIGTERM, SIGINT or SIGUSR1 (or the launcher's death) after a checkpoint of the
        step reached was committed: `--resume` continues exactly. 75 is sysexits' EX_TEMPFAIL
        ("try again later"), so a scheduler script can requeue on it, and it differs from 143 /
        130 (killed by the signal without saving).
"""

from __future__ import annotations

NONFINITE = 3
HUNG = 4
OVERFLOW = 5
PREEMPTED = 75


class RunStopped(Exception):
    """The run stopped on purpose; `code` is the process's exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
