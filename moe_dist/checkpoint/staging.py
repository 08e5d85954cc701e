"""Every conversion writes into a temporary sibling of its output directory and renames it into
place only when the whole conversion succeeded: a failed or interrupted run leaves OUT as it was
(absent, or the old one with --overwrite), never half written, so nothing downstream can mistake
a partial export for a complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

from moe_dist.checkpoint.errors import CheckpointError


def check_output(out: str, overwrite: bool) -> None:
    """Fail before any expensive work: OUT must not exist (unless `overwrite`, and then it must be
    a directory) and its parent must exist."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"the parent folder {parent!r} of output {out!r} does not exist")
    if os.path.lexists(out):
        if not overwrite:
            raise CheckpointError(f"output {out!r} already exists; choose a new path or pass --overwrite")
        if not os.path.isdir(out) or os.path.islink(out):
            raise CheckpointError(f"--overwrite replaces a directory, but output {out!r} is not one")


def _sibling(out: str, label: str) -> str:
    # Same parent as OUT, so the final rename stays on one filesystem (atomic).
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{name}.{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield an empty temporary directory; on normal exit it becomes `out` (an old `out` is
    removed only after the new one is complete); on any exception it is deleted."""
    check_output(out, overwrite)
    tmp = _sibling(out, "tmp")
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):
        old = _sibling(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
