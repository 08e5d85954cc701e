"""Local text corpora (jsonl/json, txt, parquet) read through Hugging Face `datasets`.

Only local files are accepted: paths are checked before `load_dataset` is called, and the
packaged builders ("json", "text", "parquet") never contact the Hub, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import lzma
import os
from collections.abc import Sequence

import datasets

from moe_dist.common.config import ConfigError
from moe_dist.data.jsonl_lines import first_bad_line, open_text

_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text",
            ".parquet": "parquet"}
# How a plain-text file is cut into documents.
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


def file_format(path: str) -> str:
    """'json' | 'text' | 'parquet' from the file name, ignoring a compression suffix."""
    stem = path
    for suffix in _COMPRESSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _FORMATS:
        raise ConfigError(f"input {path!r}: unknown file type {ext!r}; expected one of "
                          f"{sorted(_FORMATS)} (optionally compressed with {list(_COMPRESSIONS)})")
    return _FORMATS[ext]


def check_input_files(paths: Sequence[str]) -> str:
    """Validate local input files and return their common format; a bad input is a ConfigError."""
    if not paths:
        raise ConfigError("no input files given")
    for path in paths:
        if "://" in path:
            raise ConfigError(f"input {path!r} is a URL; only local files are read")
        if not os.path.isfile(path):
            raise ConfigError(f"input file {path!r} does not exist")
        if os.path.getsize(path) == 0:
            raise ConfigError(f"input file {path!r} is empty")
    formats = {path: file_format(path) for path in paths}
    if len(set(formats.values())) != 1:
        raise ConfigError(f"inputs mix file types {formats}; preprocess each type separately")
    return next(iter(formats.values()))


def first_unreadable(paths: Sequence[str], fmt: str) -> str | None:
    """`file: problem` for the first input that is not what its name says (random bytes, a broken
    compressed file, text that is not UTF-8, a Parquet file without its magic bytes); None when
    each one reads. Only run on the error path: it reads the files again."""
    for path in paths:
        try:
            if fmt == "parquet":
                with open(path, "rb") as f:
                    head = f.read(4)
                    f.seek(-4, os.SEEK_END)
                    tail = f.read(4)
                if head != b"PAR1" or tail != b"PAR1":
                    return (f"{path}: not a Parquet file (it must start and end with the bytes 'PAR1'; "
                            f"it starts with {head!r} and ends with {tail!r})")
                continue
            f = open_text(path)
            if f is None:
                continue
            with f:
                while f.read(1 << 20):
                    pass
        except UnicodeDecodeError as e:
            return f"{path}: not UTF-8 text ({e.reason}); expected a UTF-8 {'JSON Lines' if fmt == 'json' else 'text'} file"
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
            return f"{path}: cannot be read as a {os.path.splitext(path)[1]!r} file ({type(e).__name__}: {e})"
    return None


def load_corpus(paths: Sequence[str], columns: Sequence[str], cache_dir: str | None = None,
                text_sample_by: str = "line") -> datasets.Dataset:
    """All rows of `paths` in file order, keeping only `columns` (each must exist).

    Plain-text files have one column, "text"; `text_sample_by` says what one row is. A JSON
    Lines file that does not load is a ConfigError naming its first bad `file:line`.
    """
    fmt = check_input_files(paths)
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise ConfigError(f"text_sample_by must be one of {TEXT_SAMPLE_BY}, got {text_sample_by!r}")
    options = {"sample_by": text_sample_by} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=list(paths), split="train", cache_dir=cache_dir,
                                   **options)
    except Exception as e:  # datasets wraps a parse error in DatasetGenerationError, pandas', ...
        located = first_unreadable(paths, fmt) or (first_bad_line(paths, columns[0]) if fmt == "json" else None)
        if located is None and "corresponds to no data" in str(e):  # only blank lines
            located = f"inputs {list(paths)} hold no {fmt} rows (blank lines only); expected at least one document"
        if located is None:
            raise
        raise ConfigError(located) from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"column(s) {missing} not found in {list(paths)}; "
                          f"available columns: {ds.column_names}")
    if len(ds) == 0:
        raise ConfigError(f"inputs {list(paths)} hold no rows")
    return ds.select_columns(list(columns))


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of load_corpus, shared by the tools that read corpora."""
    parser.add_argument("--input", nargs="+", required=True,
                        help="local .jsonl/.json/.txt/.parquet files (optionally compressed)")
    parser.add_argument("--text-key", default="text",
                        help="column holding the text (json/parquet)")
    parser.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default="line",
                        help="what one row (document) of a .txt file is")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache folder")
