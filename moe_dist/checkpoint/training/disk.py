"""A checkpoint that does not fit on the disk: refused before the save when the last one shows it
cannot fit, and reported as what it is when the disk fills during the save.

torch's writer turns ENOSPC into `unexpected pos 576 vs 534` or `iostream error` (the C++
stream keeps no errno), DeepSpeed passes that on, and the user sees neither "disk" nor "space".
`no_space_error` recognises the case (an errno in the exception chain, or a probe write into the
same folder failing with ENOSPC) and gives one plain message. The partial tag is removed to give
the space back; `latest` still names the previous checkpoint, which is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
EXIT_NO_SPACE = 28  # the exit status of a run stopped by a full disk (28 = ENOSPC)
MB = 1024 * 1024


class DiskSpaceError(RuntimeError):
    """The checkpoint directory has no room for the next checkpoint."""


def tree_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
    return total


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def space_shortfall(checkpoint_dir: str, last_tag_dir: str | None) -> tuple[int, int] | None:
    """(needed, free) bytes when the next checkpoint, as large as the last one, does not fit."""
    if last_tag_dir is None or not os.path.isdir(last_tag_dir):
        return None  # the first save of a run: nothing to size it by
    needed = tree_bytes(last_tag_dir)
    free = free_bytes(checkpoint_dir)
    return (needed, free) if free < needed else None


def shortfall_message(checkpoint_dir: str, tag: str, needed: int, free: int, latest: str | None) -> str:
    kept = f"the previous checkpoint {latest!r} is intact" if latest else "no checkpoint was committed"
    return (f"no space left on device for checkpoint {tag!r} in {checkpoint_dir!r}: it needs ~{needed / MB:.1f} MB "
            f"(the size of the last one), {free / MB:.1f} MB free; {kept}. Free space (or set train.keep_last) "
            f"and resume with --resume")


def _errno_in_chain(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def probe_no_space(folder: str, size: int = MB) -> bool:
    """True when writing `size` bytes into `folder` fails with ENOSPC/EDQUOT (the disk is full now)."""
    if not os.path.isdir(folder):
        return False
    path = os.path.join(folder, f".space_probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return False
    except OSError as e:
        return e.errno in NO_SPACE_ERRNOS
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def no_space_error(exc: BaseException, checkpoint_dir: str, tag: str, latest: str | None,
                   needed: int | None = None, remove: bool = True) -> DiskSpaceError | None:
    """The plain error for a save that failed because the disk is full, else None. With `remove`
    (rank 0 only: its probe must come before anyone frees space) the partial tag is removed; a
    tag directory that vanished meanwhile was removed by rank 0 for this reason."""
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        full = not remove or _errno_in_chain(exc) or probe_no_space(checkpoint_dir)
    else:
        full = _errno_in_chain(exc) or probe_no_space(tag_dir)
    if not full:
        return None
    written = tree_bytes(tag_dir)
    if remove:
        shutil.rmtree(tag_dir, ignore_errors=True)
    free = free_bytes(checkpoint_dir)
    kept = f"the previous checkpoint {latest!r} is intact" if latest else "no checkpoint was committed"
    need = f"it needs ~{needed / MB:.1f} MB (the size of the last one), " if needed else ""
    removed = "was removed" if remove else "is removed by rank 0"
    return DiskSpaceError(f"no space left on device while saving checkpoint {tag!r} in {checkpoint_dir!r}: "
                          f"{need}{written / MB:.1f} MB had been written, {free / MB:.1f} MB free now "
                          f"({type(exc).__name__}: {str(exc)[:160]}); the partial tag {removed} and {kept}. "
                          f"Free space (or set train.keep_last) and resume with --resume")
