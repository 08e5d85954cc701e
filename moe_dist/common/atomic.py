"""Atomic writes: every output is written under a temporary name in its own folder and renamed
onto its final name only once it is complete, so a crash or a failure never leaves a half-written
file (a checkpoint pointer, a tokenized corpus, a compiled kernel, an exported model) where a
reader would take it for a finished one. The rename stays in one folder, hence one filesystem,
which is what makes it atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence

from moe_dist.common.config import ConfigError


def temporary_sibling(final_path: str, label: str = "tmp") -> str:
    """A hidden, unique name beside `final_path` (same folder, so a rename onto it is atomic)."""
    folder, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(folder, f".{name}.{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_output_file(final_path: str) -> None:
    """Fail before the expensive work, not at the rename after it: the folder must exist and the
    path must not be a directory. Either is the user's choice of output, so a ConfigError."""
    folder = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(folder):
        raise ConfigError(f"output folder {folder!r} for {final_path!r} does not exist; create it first")
    if os.path.isdir(final_path):
        raise ConfigError(f"output {final_path!r} is a directory; expected a file path")


def make_output_folder(final_path: str) -> str:
    """Create the folder `final_path` goes into, as `mkdir -p` would, so that a documented command
    such as `--output-prefix tok/fortunes` works on a fresh clone; a folder that cannot be created
    (a file in its way, no permission) is a ConfigError naming it. Returns the folder."""
    folder = os.path.dirname(os.path.abspath(final_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {folder!r} for {final_path!r}: "
                          f"{e.strerror or e}") from None
    return folder


def fsync_file(path: str) -> None:
    """Flush `path`'s data to the device, so that a rename published after it never points at
    data still in the page cache when the machine goes down."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def staged_files(final_paths: Sequence[str], *, fsync: bool = True) -> Iterator[dict[str, str]]:
    """Yield {final path: temporary path}. On normal exit every temporary file must exist; each is
    fsynced (unless `fsync=False`) and renamed onto its final path in the order given, so put the
    file readers look for first (an `.idx`, a `latest`) last. On an exception the temporary files
    are deleted and the final paths are left as they were."""
    for path in final_paths:
        check_output_file(path)
    staged = {path: temporary_sibling(path) for path in final_paths}
    try:
        yield staged
        missing = [tmp for tmp in staged.values() if not os.path.isfile(tmp)]
        if missing:
            raise RuntimeError(f"staged outputs were not written: {missing}")
        if fsync:
            for tmp in staged.values():
                fsync_file(tmp)
    except BaseException:
        for tmp in staged.values():
            _remove_quietly(tmp)
        raise
    for final, tmp in staged.items():
        os.replace(tmp, final)


@contextlib.contextmanager
def staged_file(final_path: str, *, fsync: bool = True) -> Iterator[str]:
    """`staged_files` for one file: yield its temporary path."""
    with staged_files([final_path], fsync=fsync) as staged:
        yield staged[final_path]


def write_text_atomic(path: str, text: str) -> None:
    """Replace `path` by `text` atomically (and durably)."""
    with staged_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def fsync_tree(root: str) -> None:
    """fsync every file under `root`, then every folder (their entries), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_file(folder)


@contextlib.contextmanager
def staged_directory(out: str, *, fsync: bool = True) -> Iterator[str]:
    """Yield an empty temporary directory beside `out`; on normal exit its files are fsynced
    (unless `fsync=False`) and it becomes `out` (an old `out` is removed only after the new one is
    in place); on any exception it is deleted."""
    tmp = temporary_sibling(out)
    os.mkdir(tmp)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)  # the rename must never publish data still in the page cache
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):
        old = temporary_sibling(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    if fsync:
        fsync_file(os.path.dirname(os.path.abspath(out)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
