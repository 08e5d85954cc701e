"""Every conversion writes into a temporary sibling of its output directory and renames it into
place only when the whole conversion succeeded: a failed or interrupted run leaves OUT as it was
(absent, or the old one with --overwrite), never half written, so nothing downstream can mistake
a partial export for a complete one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from moe_dist.checkpoint.errors import CheckpointError
from moe_dist.common import atomic


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


@contextlib.contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """`moe_dist.common.atomic.staged_directory` after `check_output`."""
    check_output(out, overwrite)
    with atomic.staged_directory(out) as tmp:
        yield tmp
