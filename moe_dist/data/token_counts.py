"""Token counts of a tokenized corpus: how often each token id occurs in Megatron `.bin/.idx`
prefixes, the input of the `hash` router's frequency-balanced table (docs/routers/hash.md).

Written as a `.npy` of int64 [vocab_size] (`tools/preprocess_data.py --token-counts`), under a
temporary name and renamed when complete. The counts cover every document of the prefixes, all
splits: what Megatron-Core carves out for validation is a small share, and a table balanced on a
slightly larger sample of the same data is not less balanced on its training part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_dist.common.atomic import check_output_file, staged_file
from moe_dist.common.config import ConfigError
from moe_dist.data.index_check import read_index

# Tokens read per bincount: bounded memory whatever the corpus size.
CHUNK_TOKENS = 1 << 24


def count_tokens(prefixes: Sequence[str], vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: occurrences of each token id in the `.bin` files of `prefixes`.
    ConfigError if a token id is >= vocab_size (naming the file), before anything is written."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for prefix in prefixes:
        summary = read_index("token counts", prefix)
        if summary.bin_bytes == 0:
            continue
        tokens = np.memmap(prefix + ".bin", dtype=summary.dtype, mode="r")
        try:
            for start in range(0, len(tokens), CHUNK_TOKENS):
                chunk = np.asarray(tokens[start:start + CHUNK_TOKENS], dtype=np.int64)
                largest = int(chunk.max())
                if largest >= vocab_size:
                    raise ConfigError(f"token counts: {prefix + '.bin'!r} holds token id {largest}, but the "
                                      f"vocabulary has {vocab_size} ids")
                counts += np.bincount(chunk, minlength=vocab_size)
        finally:
            del tokens
    return counts


def write_token_counts(path: str, counts: np.ndarray) -> None:
    """Save `counts` as a .npy at `path`, atomically."""
    check_output_file(path)
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(counts, dtype=np.int64), allow_pickle=False)
