"""`<prefix>.tokenizer.json`: which tokenizer wrote a prefix's token ids, so that a reader with
another tokenizer is refused instead of computing nonsense (a byte-tokenized prefix under an
8000-piece SentencePiece model has every id in range, and a perplexity in the tens of thousands).

{"identifiers": the tokenizer's `unique_identifiers` (class, sha256 of its files), "vocab_size",
"description": what a message shows}. Identity is content, as for the cached sample indices: a
model file that moved is the same tokenizer. Prefixes written before this file existed have none
and are not checked.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moe_dist.common.config import ConfigError


def tokenizer_record_path(prefix: str) -> str:
    return prefix + ".tokenizer.json"


def describe_tokenizer(tokenizer, origin: str | None = None) -> str:
    """'SentencePieceTokenizer tok/x.model (vocab 8000, sha256 1a2b3c4d)'; `origin` is the file or
    folder it was read from, when known."""
    ids = dict(tokenizer.unique_identifiers)
    where = f" {origin}" if origin else ""
    digest = f", sha256 {ids['sha256'][:12]}" if "sha256" in ids else ""
    return f"{ids.get('cls', type(tokenizer).__name__)}{where} (vocab {tokenizer.vocab_size}{digest})"


def tokenizer_origin(tokenizer) -> str | None:
    """The model file or folder a tokenizer was read from (None for the byte tokenizer)."""
    path = getattr(tokenizer, "path", None)
    return path if isinstance(path, str) else None


def tokenizer_record(tokenizer) -> dict[str, Any]:
    return {"identifiers": dict(tokenizer.unique_identifiers), "vocab_size": int(tokenizer.vocab_size),
            "description": describe_tokenizer(tokenizer, tokenizer_origin(tokenizer))}


def write_tokenizer_record(path: str, tokenizer) -> None:
    with open(path, "w") as f:
        json.dump(tokenizer_record(tokenizer), f, indent=1)


def read_tokenizer_record(prefix: str) -> dict[str, Any] | None:
    path = tokenizer_record_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        record["identifiers"], record["description"]  # noqa: B018 - both keys are required
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"tokenizer record {path!r} is unreadable ({type(e).__name__}: {e}); rerun "
                          f"tools/preprocess_data.py for {prefix!r}") from None
    return record


def check_prefix_tokenizer(where: str, prefix: str, tokenizer, tokenizer_where: str) -> None:
    """ConfigError when `prefix` records a tokenizer other than `tokenizer` (`tokenizer_where` says
    whose it is: "checkpoint X's", "data.tokenizer")."""
    record = read_tokenizer_record(prefix)
    if record is None or record["identifiers"] == dict(tokenizer.unique_identifiers):
        return
    raise ConfigError(f"{where} {prefix!r} was tokenized with {record['description']} "
                      f"({tokenizer_record_path(prefix)}), but {tokenizer_where} tokenizer is "
                      f"{describe_tokenizer(tokenizer, tokenizer_origin(tokenizer))}; token ids of one "
                      f"tokenizer mean nothing to the other: preprocess the text again with "
                      f"{tokenizer_where} tokenizer")
