"""Where in a JSON Lines input a problem is, as `file:line`: Hugging Face `datasets` reports a
malformed line as "An error occurred while generating the dataset" (or a pandas "Expected object
or value") and a bad value by its row in the whole corpus, neither of which a user can open.

Only run on the error path: the happy path never reads the files twice.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterator, Sequence

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def open_text(path: str):
    """The file as UTF-8 text, decompressed by its suffix; None for a compression without a stdlib reader."""
    for suffix, opener in _OPENERS.items():
        if path.endswith(suffix):
            return opener(path, "rt", encoding="utf-8")
    if path.endswith((".zst", ".lz4")):
        return None  # no stdlib reader: left to the library's own message
    return open(path, encoding="utf-8")


def _rows(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of each non-blank line, as the json loader skips blank ones; nothing
    for a file that is one JSON document (an array) rather than JSON Lines."""
    f = open_text(path)
    if f is None:
        return
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                return
            yield number, line


def first_bad_line(paths: Sequence[str], text_key: str) -> str | None:
    """`file:line: problem` for the first line that is not a JSON object or whose `text_key` is
    not a string; None when every line is fine."""
    for path in paths:
        try:
            for number, line in _rows(path):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}"
                if not isinstance(row, dict):
                    return f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}"
                if text_key in row and not isinstance(row[text_key], str):
                    value = row[text_key]
                    return (f"{path}:{number}: column {text_key!r} must hold a string, got "
                            f"{type(value).__name__} ({value!r:.80})")
        except UnicodeDecodeError as e:
            return f"{path}: not UTF-8 text ({e})"
    return None


def locate_row(paths: Sequence[str], row: int) -> str | None:
    """`file:line` of corpus row `row` (0-based, rows in file order), or None if unknown."""
    seen = 0
    for path in paths:
        for number, _ in _rows(path):
            if seen == row:
                return f"{path}:{number}"
            seen += 1
    return None
