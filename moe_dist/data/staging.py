"""Write a set of output files under temporary names and publish them by rename only on success.

A crashed or failed tokenizer/preprocessing run must never leave a half-written file under a
final name, where a later training job would read it as if it were complete.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence


def _staging_path(final_path: str) -> str:
    # Same folder as the final file, so that the rename is atomic (one filesystem).
    folder, name = os.path.split(os.path.abspath(final_path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_output_folder(final_path: str) -> None:
    """Fail before the expensive work, not at the rename after it."""
    folder = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} for {final_path!r} does not exist")
    if os.path.isdir(final_path):
        raise IsADirectoryError(f"output {final_path!r} is a directory")


@contextlib.contextmanager
def staged_outputs(final_paths: Sequence[str]) -> Iterator[dict[str, str]]:
    """Yield {final path: temporary path}; on normal exit rename every temporary file onto its
    final path in the order given (put the file readers look for first, e.g. `.idx`, last); on
    an exception delete the temporary files and leave the final paths untouched.
    """
    for path in final_paths:
        check_output_folder(path)
    staged = {path: _staging_path(path) for path in final_paths}
    try:
        yield staged
        missing = [tmp for tmp in staged.values() if not os.path.isfile(tmp)]
        if missing:
            raise RuntimeError(f"staged outputs were not written: {missing}")
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    for final, tmp in staged.items():
        os.replace(tmp, final)
