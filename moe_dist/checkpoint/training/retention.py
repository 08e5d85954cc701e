"""What the trainer deletes in its checkpoint directory, and nothing else: partial tags a crashed
save left (moe_dist/checkpoint/training/tags.py says which those are) at the next start, and the oldest
complete tags of the run beyond `train.keep_last` after `latest` has moved (tags of another run id
are never deleted: a folder shared by mistake keeps both runs' checkpoints).

A tag is deleted by renaming it to a hidden `.deleting-<tag>-...` name first and removing that:
a crash in the middle of the removal then leaves a hidden folder (removed at the next start), not
a tag with its marker but half its files, so `latest` never names, and `--resume` never loads, a
half-deleted tag.

`train.keep_last` deletions run in a background thread of rank 0, after every rank has left the
save's last collective: on a slow shared filesystem removing a checkpoint of many GB can take
longer than the collective timeout, and it no longer holds any rank. Jobs run one at a time, in
order; each keeps the tag `latest` names and the tag just written. Before the process exits (and
before a new start in the same process removes partial tags) it waits for them, bounded, saying
so; a deletion cut short by that bound or by a crash is a hidden folder, removed at the next start.
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
import time
from typing import Callable, Iterable

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import COMPLETE, PARTIAL, list_tags
from moe_dist.common.atomic import temporary_sibling

DELETING = "deleting"
# How long a process that is done waits at exit for its pending deletions, and how long a save that
# lacks disk space waits for them to free it, before going on without them.
EXIT_WAIT_S = 600.0
SPACE_WAIT_S = 60.0


def delete_tag(checkpoint_dir: str, tag: str) -> None:
    path = os.path.join(checkpoint_dir, tag)
    aside = temporary_sibling(path, DELETING)
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


class _Deletions:
    """A queue of deletion jobs run in order by one daemon thread, started on demand."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: list[Callable[[], None]] = []
        self._busy = False
        self._thread: threading.Thread | None = None
        self._atexit = False

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="moe_dist-retention", daemon=True)
                self._thread.start()
            if not self._atexit:
                # A daemon thread would be killed at exit unnoticed; this waits for it first.
                atexit.register(wait_at_exit)
                self._atexit = True

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._busy, self._thread = False, None
                    self._cond.notify_all()
                    return
                job, self._busy = self._jobs.pop(0), True
            try:
                job()
            except Exception as e:  # noqa: BLE001 - a failed deletion must not end the training
                print(f"checkpoint retention: {type(e).__name__}: {e} (the tag stays; the next save's "
                      f"retention tries again)", flush=True)

    def pending(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._busy

    def wait(self, timeout_s: float | None) -> bool:
        """True once no job is queued or running; False if `timeout_s` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout_s)


_deletions = _Deletions()


def deletions_pending() -> bool:
    return _deletions.pending()


def wait_for_deletions(timeout_s: float = EXIT_WAIT_S, why: str = "asked") -> bool:
    """Wait for the pending deletions, at most `timeout_s` seconds, saying why and how it ended."""
    if not _deletions.pending():
        return True
    print(f"checkpoint retention: waiting up to {timeout_s:g}s for old checkpoints to be deleted ({why})",
          flush=True)
    t0 = time.monotonic()
    done = _deletions.wait(timeout_s)
    if done:
        print(f"checkpoint retention: deletions done after {time.monotonic() - t0:.1f}s", flush=True)
    else:
        print(f"checkpoint retention: deletions still running after {timeout_s:g}s; going on without them "
              f"(a tag cut short is a hidden .*.{DELETING}-* folder, removed at the next start)", flush=True)
    return done


def wait_at_exit() -> None:
    wait_for_deletions(EXIT_WAIT_S, "the process is exiting")


def remove_partial_tags(checkpoint_dir: str) -> list[str]:
    """Remove the partial tags (and half-deleted leftovers) of `checkpoint_dir`; returns the tags."""
    wait_for_deletions(EXIT_WAIT_S, "a run starts in this process")  # not two removers of one folder
    if not os.path.isdir(checkpoint_dir):
        return []
    for name in os.listdir(checkpoint_dir):
        if name.startswith(".step_") and f".{DELETING}-" in name:
            shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
    removed = [s.tag for s in list_tags(checkpoint_dir) if s.status == PARTIAL]
    for tag in removed:
        delete_tag(checkpoint_dir, tag)
    return removed


def apply_keep_last(checkpoint_dir: str, keep_last: int | None, protect: Iterable[str] = (), *,
                    run_id: str | None) -> list[str]:
    """Delete the oldest complete tags of run `run_id` so that at most `keep_last` of them remain;
    the tag `latest` names and the tags in `protect` are always kept. Tags of other runs (their
    marker's run id) and legacy tags (no marker) are never deleted nor counted. Returns the
    deleted tags."""
    if keep_last is None:
        return []
    latest = read_latest(checkpoint_dir)
    complete = [s.tag for s in list_tags(checkpoint_dir) if s.status == COMPLETE and s.run_id == run_id]
    keep = set(complete[-keep_last:]) | {latest} | set(protect)
    deleted = [t for t in complete if t not in keep]
    for tag in deleted:
        delete_tag(checkpoint_dir, tag)
    return deleted


def apply_keep_last_in_background(checkpoint_dir: str, keep_last: int | None, just_written: str, *,
                                  run_id: str | None) -> None:
    """`apply_keep_last` on the deletion thread (rank 0, after the save's collectives); each tag
    deleted is logged once the job is done."""
    if keep_last is None:
        return

    def job() -> None:
        for old in apply_keep_last(checkpoint_dir, keep_last, protect=(just_written,), run_id=run_id):
            print(f"train.keep_last={keep_last}: deleted checkpoint {old}", flush=True)
    _deletions.submit(job)
