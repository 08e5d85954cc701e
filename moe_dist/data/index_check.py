"""Checks of Megatron `.bin/.idx` prefixes that read only the index (and the token file's size,
or a bounded part of it), so that preflight can refuse bad data before any process group exists.

Why each one: a `.bin` shorter than its index says is read through a memory map and fails only
when a sample touches the missing bytes (at the first evaluation, or hours in); a split share
with no documents makes Megatron-Core's `GPTDataset._get_num_epochs` loop for ever (it adds
empty epochs until they hold the requested tokens); token ids beyond the model's vocabulary fail
at the first forward with an `IndexError` far from the file that holds them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix, parse_and_normalize_split)
from megatron.core.datasets.indexed_dataset import DType

from moe_dist.common.config import ConfigError

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, two counts
SPLIT_NAMES = ("train", "valid", "test")
# Token files up to this size are scanned whole for the largest id (a max over a memory map: well
# under a second); larger ones are sampled, which the error and docs/data.md say.
FULL_SCAN_BYTES = 256 << 20
SAMPLE_WINDOWS, SAMPLE_WINDOW_BYTES = 64, 1 << 20


@dataclass(frozen=True)
class IndexSummary:
    """What a prefix's `.idx` says about its `.bin`."""

    prefix: str
    dtype: type
    sequence_lengths: np.ndarray  # int32 [num sequences]: tokens of each document
    bin_bytes: int  # the size the index implies for the .bin

    @property
    def num_documents(self) -> int:
        return len(self.sequence_lengths)


def read_index(where: str, prefix: str) -> IndexSummary:
    """Parse `<prefix>.idx` (Megatron-Core's format, version 1) and check `<prefix>.bin` holds
    exactly the bytes it describes; ConfigError naming the file otherwise."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise ConfigError(f"{where}: {idx_path!r} is not a Megatron-Core index (expected the header "
                          f"{_INDEX_HEADER!r} and {_HEADER_BYTES} header bytes, found {head[:9]!r}, "
                          f"{size} bytes); write it with tools/preprocess_data.py")
    version, code, num_seq, num_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise ConfigError(f"{where}: {idx_path!r} has index version {version}, expected 1")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise ConfigError(f"{where}: {idx_path!r} has an unknown token dtype code {code}") from None
    expected_idx = _HEADER_BYTES + num_seq * (4 + 8) + num_doc * 8
    if size < expected_idx:
        raise ConfigError(f"{where}: {idx_path!r} is truncated: {size} bytes, but its header announces "
                          f"{num_seq} sequences and {num_doc} document offsets ({expected_idx} bytes)")
    with open(idx_path, "rb") as f:
        f.seek(_HEADER_BYTES)
        lengths = np.frombuffer(f.read(num_seq * 4), dtype=np.int32)
        pointers = np.frombuffer(f.read(num_seq * 8), dtype=np.int64)
    item = DType.size(dtype)
    bin_bytes = int(pointers[-1]) + int(lengths[-1]) * item if num_seq else 0
    actual = os.path.getsize(bin_path)
    if actual != bin_bytes:
        state = "truncated" if actual < bin_bytes else "longer than its index says"
        raise ConfigError(
            f"{where}: {bin_path!r} is {state}: {actual} bytes, but {idx_path!r} describes {num_seq} "
            f"documents of {int(lengths.sum(dtype=np.int64))} {dtype.__name__} tokens ({bin_bytes} "
            f"bytes); the pair does not belong together or a copy was cut short: preprocess again")
    return IndexSummary(prefix=prefix, dtype=dtype, sequence_lengths=lengths, bin_bytes=bin_bytes)


def split_document_counts(split: str, num_documents: int) -> list[int | None]:
    """Documents of each split (train, valid, test) as Megatron-Core cuts a prefix: its split
    matrix, then `round(bookend * num_documents)` (blended_megatron_dataset_builder.py); None for
    a split with no share."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if b is None else round(b[1] * float(num_documents)) - round(b[0] * float(num_documents))
            for b in matrix]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int] | None]:
    """[begin, end) document range of each split (train, valid, test) of a prefix, cut as
    `split_document_counts` counts them; None for a split with no share."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if b is None else (round(b[0] * float(num_documents)), round(b[1] * float(num_documents)))
            for b in matrix]


def check_split_shares(where: str, summary: IndexSummary, split: str, requested: dict[str, int]) -> None:
    """Each split asked for samples (requested[name] > 0) that has a share must get at least one
    document with tokens in this prefix."""
    counts = split_document_counts(split, summary.num_documents)
    beg = 0
    for name, count in zip(SPLIT_NAMES, counts):
        if count is None:
            continue
        tokens = int(summary.sequence_lengths[beg:beg + count].sum(dtype=np.int64))
        beg += count
        if requested.get(name, 0) > 0 and tokens == 0:
            raise ConfigError(
                f"{where}: prefix {summary.prefix!r} has {summary.num_documents} documents, and split "
                f"{split!r} gives its {name} share {count} documents ({tokens} tokens), but the run asks "
                f"for {requested[name]} {name} samples (Megatron-Core would loop for ever); use more "
                f"documents or a split that gives {name} at least one")


def largest_token_id(summary: IndexSummary) -> tuple[int, str]:
    """The largest token id in the `.bin`, and how it was found ('a full scan' or 'a sample of
    N windows'): whole files up to FULL_SCAN_BYTES, else evenly spaced windows, first and last
    included."""
    if summary.bin_bytes == 0:
        return -1, "a full scan"
    tokens = np.memmap(summary.prefix + ".bin", dtype=summary.dtype, mode="r")
    try:
        if summary.bin_bytes <= FULL_SCAN_BYTES:
            return int(tokens.max()), "a full scan"
        window = SAMPLE_WINDOW_BYTES // tokens.itemsize
        starts = np.linspace(0, len(tokens) - window, SAMPLE_WINDOWS).astype(np.int64)
        return (max(int(tokens[s:s + window].max()) for s in starts),
                f"a sample of {SAMPLE_WINDOWS} windows of {SAMPLE_WINDOW_BYTES >> 20} MiB")
    finally:
        del tokens


def check_token_ids(where: str, summary: IndexSummary, vocab_limit: int, limit_name: str) -> None:
    """Every token id must be < vocab_limit (the smaller of the model's and the tokenizer's)."""
    largest, how = largest_token_id(summary)
    if largest >= vocab_limit:
        raise ConfigError(
            f"{where}: {summary.prefix + '.bin'!r} holds token id {largest} (largest found by {how}), but "
            f"{limit_name} is {vocab_limit}: the data was tokenized with a larger vocabulary than this "
            f"run's tokenizer and model; preprocess it with this tokenizer or configure the one it used")
