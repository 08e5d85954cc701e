"""A checkpoint that does not fit on the disk: refused before the save when the last one shows it
cannot fit, and reported as what it is when the disk fills during the save. A folder that cannot
be written at all (a filesystem gone read-only, no permission) is its own error with its own exit
status: freeing space does not help it, and a scheduler must not requeue it as a full disk.

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

from moe_dist.common.config import ConfigError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
EXIT_NO_SPACE = 28  # the exit status of a run stopped by a full disk (28 = ENOSPC)
EXIT_NOT_WRITABLE = 30  # a checkpoint folder that cannot be written during the run (30 = EROFS)
MB = 1024 * 1024


class DiskSpaceError(RuntimeError):
    """The checkpoint directory has no room for the next checkpoint."""


class NotWritableError(RuntimeError):
    """The checkpoint directory cannot be written: a read-only filesystem or no permission."""


def errno_words(code: int | None) -> str:
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return os.strerror(code) if code else "unknown error"


def _write_probe(folder: str, size: int) -> int | None:
    """The errno of creating, writing and fsyncing `size` bytes in `folder`, None when it works."""
    path = os.path.join(folder, f".space_probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if size:
                os.write(fd, b"\0" * size)
                os.fsync(fd)
        finally:
            os.close(fd)
        return None
    except OSError as e:
        return e.errno
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def check_writable_dir(path: str | None, what: str = "train.checkpoint_dir") -> None:
    """Refuse, before any work, a checkpoint folder this process cannot create files in (or that
    is a file): the first save would fail only after the run's start-up and first interval."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a file, not a folder; expected a folder for the run's "
                          f"checkpoints (or a path that does not exist yet)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folder is created later: its nearest ancestor decides
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{what} {path!r} cannot be created: {existing!r} is a file, not a folder")
    code = _write_probe(existing, 0)
    if code is not None:
        where = "" if existing == os.path.abspath(path) else f" (its parent {existing!r}, where it would be created)"
        raise ConfigError(f"{what} {path!r} cannot be written{where}: {errno_words(code)} (errno {code}); "
                          f"expected a folder this run can create files in")


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


# torch's C++ writer keeps only the strerror text ("open file failed with strerror: Read-only
# file system"), so the texts count as much as an OSError's errno.
_ERRNO_TEXTS = ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"),
                (errno.EPERM, "Operation not permitted"))


def errno_in_chain(exc: BaseException) -> int | None:
    """The first disk errno (full, read-only or permission) the exception or its causes carry."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS + NOT_WRITABLE_ERRNOS:
            return exc.errno
        for code, text in _ERRNO_TEXTS:
            if text in str(exc):
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _errno_in_chain(exc: BaseException) -> bool:
    return errno_in_chain(exc) in NO_SPACE_ERRNOS


def probe_errno(folder: str, size: int = MB) -> int | None:
    """The errno of writing `size` bytes into `folder` when it is a disk fault (full, read-only,
    no permission) now, else None."""
    if not os.path.isdir(folder):
        return None
    code = _write_probe(folder, size)
    return code if code in NO_SPACE_ERRNOS + NOT_WRITABLE_ERRNOS else None


def probe_tag_errno(tag_dir: str, size: int = MB) -> int | None:
    """probe_errno for a tag folder that does not exist: DeepSpeed logs a failed makedirs and goes
    on, so torch then says only "Parent directory ... does not exist". Creating the folder shows
    why (read-only, no permission), writing into it whether the disk is full; it is removed again."""
    try:
        os.mkdir(tag_dir)
    except FileExistsError:
        return probe_errno(tag_dir, size)
    except OSError as e:
        return e.errno if e.errno in NO_SPACE_ERRNOS + NOT_WRITABLE_ERRNOS else None
    try:
        return probe_errno(tag_dir, size)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tag_dir)


def probe_no_space(folder: str, size: int = MB) -> bool:
    """True when writing `size` bytes into `folder` fails with ENOSPC/EDQUOT (the disk is full now)."""
    return probe_errno(folder, size) in NO_SPACE_ERRNOS


def disk_error(exc: BaseException, checkpoint_dir: str, tag: str, latest: str | None,
               needed: int | None = None, remove: bool = True) -> DiskSpaceError | NotWritableError | None:
    """The plain error for a save that failed on the disk, else None: a full disk (DiskSpaceError)
    or a folder that cannot be written (NotWritableError: read-only filesystem, no permission).
    The errno comes from the exception chain, else from a probe write into the tag (or, gone or
    never made, the checkpoint folder). With `remove` (rank 0 only: its probe must come before
    anyone frees space) the partial tag of a full disk is removed; a tag directory that vanished
    meanwhile was removed by rank 0 for that reason. A partial tag of an unwritable folder stays
    (it cannot be removed either); the next start removes it."""
    tag_dir = os.path.join(checkpoint_dir, tag)
    code = errno_in_chain(exc)
    if code is None:
        code = probe_errno(tag_dir) if os.path.isdir(tag_dir) else probe_tag_errno(tag_dir)
    if code is None and not remove and not os.path.isdir(tag_dir):
        code = errno.ENOSPC
    if code is None:
        return None
    kept = f"the previous checkpoint {latest!r} is intact" if latest else "no checkpoint was committed"
    cause = f"({type(exc).__name__}: {str(exc)[:160]})"
    if code in NOT_WRITABLE_ERRNOS:
        return NotWritableError(f"cannot write checkpoint {tag!r} in {checkpoint_dir!r}: {errno_words(code)} "
                                f"(errno {code}, not a full disk) {cause}; {kept}, and a partial {tag!r} is removed "
                                f"at the next start. Make the folder writable again (remount it read-write, fix "
                                f"its owner or permissions) and resume with --resume")
    written = tree_bytes(tag_dir)
    if remove:
        shutil.rmtree(tag_dir, ignore_errors=True)
    free = free_bytes(checkpoint_dir)
    need = f"it needs ~{needed / MB:.1f} MB (the size of the last one), " if needed else ""
    removed = "was removed" if remove else "is removed by rank 0"
    return DiskSpaceError(f"no space left on device while saving checkpoint {tag!r} in {checkpoint_dir!r}: "
                          f"{need}{written / MB:.1f} MB had been written, {free / MB:.1f} MB free now "
                          f"{cause}; the partial tag {removed} and {kept}. "
                          f"Free space (or set train.keep_last) and resume with --resume")


no_space_error = disk_error  # its name before read-only folders were told apart
