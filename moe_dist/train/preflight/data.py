"""Preflight's data checks: the domains the data will carry and, for Megatron-Core indexed data,
that every `.bin` has the size its `.idx` implies, every prefix gives each requested split at least
one document, no token id reaches the vocabulary (moe_dist/data/index_check.py), each prefix's
recorded tokenizer is the run's (tokenizer_record.py), and the validation split holds every
labelled domain of the train split. They read label sidecars and index headers, never build an
index.

`input_identity` is what a checkpoint records of the tokenizer and the data, and what `--resume`
compares (moe_dist/checkpoint/training/resume.py): a tokenizer retrained in place, or a prefix
re-preprocessed or swapped, keeps its path but not its content.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from moe_dist.common.config import ConfigError
from moe_dist.data.config import DataConfig
from moe_dist.data.datasets import blend_domain_names
from moe_dist.data.index_check import check_split_shares, check_token_ids, read_index, split_document_ranges
from moe_dist.data.labels import label_sidecar_paths, read_label_names
from moe_dist.data.tokenizer_record import check_prefix_tokenizer


def data_domain_names(data: DataConfig) -> list[str]:
    """Domain names the data will carry, read from label sidecars (cheap: no index is built)."""
    if data.kind == "synthetic":
        return [f"domain{d}" for d in range(data.synthetic.num_domains)]
    return blend_domain_names(data.megatron.prefixes)


def check_megatron_data(data: DataConfig, tokenizer, model_vocab_size: int, train_samples: int,
                        valid_samples: int, check_tokenizer_records: bool = True) -> None:
    """Index/size agreement, documents per split share, largest token id; reads each .idx and
    at most FULL_SCAN_BYTES (else a sample) of each .bin. `check_tokenizer_records`: each prefix's
    recorded tokenizer must be `tokenizer` (off for --resume, whose input check reports a changed
    tokenizer against the checkpoint's record and lets --allow_config_change accept it)."""
    if data.kind != "megatron":
        return
    limit = min(tokenizer.vocab_size, model_vocab_size)
    limit_name = (f"the tokenizer's vocab_size ({type(tokenizer).__name__}, data.tokenizer.kind "
                  f"{data.tokenizer.kind!r}; model.vocab_size {model_vocab_size})")
    requested = {"train": train_samples, "valid": valid_samples}
    num_documents = []
    for i, prefix in enumerate(data.megatron.prefixes):
        where = f"data.megatron.prefixes[{i}]"
        summary = read_index(where, prefix)
        check_split_shares(where, summary, data.megatron.split, requested)
        check_token_ids(where, summary, limit, limit_name)
        if check_tokenizer_records:
            check_prefix_tokenizer(where, prefix, tokenizer, "this run's (data.tokenizer)")
        num_documents.append(summary.num_documents)
    if valid_samples > 0:
        check_valid_domains(data, num_documents)


def split_domains(prefix: str, split: str, num_documents: int) -> tuple[set[str], set[str]]:
    """(labels in the train share, labels in the valid share) of one prefix; empty without labels."""
    names = read_label_names(prefix)
    if not names:
        return set(), set()
    # A memory map: only the two slices' labels are read.
    ids = np.load(label_sidecar_paths(prefix)[0], mmap_mode="r")
    train, valid = split_document_ranges(split, num_documents)[:2]
    found = []
    for share in (train, valid):
        found.append(set() if share is None else
                     {names[i] for i in np.unique(np.asarray(ids[share[0]:share[1]])) if i >= 0})
    return found[0], found[1]


def check_valid_domains(data: DataConfig, num_documents: list[int]) -> None:
    """The validation split must hold every labelled domain the train split holds. Megatron-Core
    takes each prefix's valid documents from the end of the prefix (its last `split` share): with
    several corpora preprocessed into one prefix that is the last file's documents alone, and
    validation loss, per-domain numbers and I(expert; domain) would silently measure one domain.
    Refused rather than warned: every validation of the run would be wrong, and the fix (one prefix
    per corpus or label, blended by data.megatron.prefixes) costs one preprocessing run."""
    train_domains: set[str] = set()
    valid_domains: set[str] = set()
    holders: dict[str, list[str]] = {}
    for prefix, n in zip(data.megatron.prefixes, num_documents):
        train, valid = split_domains(prefix, data.megatron.split, n)
        train_domains |= train
        valid_domains |= valid
        for name in train:
            holders.setdefault(name, []).append(prefix)
    missing = sorted(train_domains - valid_domains)
    if not missing:
        return
    raise ConfigError(
        f"data.megatron: the validation split (the last share of each prefix's documents under split "
        f"{data.megatron.split!r}) holds domains {sorted(valid_domains)} but not {missing}, which the train split "
        f"holds (in {sorted({p for name in missing for p in holders[name]})}); validation would measure "
        f"{sorted(valid_domains)} alone. Preprocess each corpus (or label) into its own prefix and list them all "
        f"in data.megatron.prefixes (docs/data.md), or shuffle the documents before preprocessing")


# The .bin is sampled, not hashed whole (it can be terabytes): this many windows of this many bytes,
# evenly spaced, the first and the last included; a file no larger than all of them is read whole.
BIN_SAMPLE_WINDOWS = 16
BIN_SAMPLE_BYTES = 64 * 1024


def bin_sample_sha256(path: str) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= BIN_SAMPLE_WINDOWS * BIN_SAMPLE_BYTES:
            h.update(f.read())
            return h.hexdigest()
        step = (size - BIN_SAMPLE_BYTES) / (BIN_SAMPLE_WINDOWS - 1)
        for i in range(BIN_SAMPLE_WINDOWS):
            f.seek(int(i * step))
            h.update(f.read(BIN_SAMPLE_BYTES))
    return h.hexdigest()


def prefix_identity(prefix: str) -> dict[str, Any]:
    """Sizes of `.idx` and `.bin`, sha256 of the whole `.idx` (document lengths and offsets: small)
    and of a sample of the `.bin` (BIN_SAMPLE_WINDOWS windows of BIN_SAMPLE_BYTES)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        idx_sha = hashlib.sha256(f.read()).hexdigest()
    return {"prefix": prefix, "idx_bytes": os.path.getsize(idx), "bin_bytes": os.path.getsize(bin_),
            "idx_sha256": idx_sha, "bin_sample_sha256": bin_sample_sha256(bin_)}


def input_identity(data: DataConfig, tokenizer) -> dict[str, Any]:
    """{"tokenizer": its unique identifiers (class, sha256 of its files), "data": one
    prefix_identity per Megatron-Core prefix (none for synthetic data)}."""
    prefixes = data.megatron.prefixes if data.kind == "megatron" else []
    return {"tokenizer": dict(tokenizer.unique_identifiers),
            "data": [prefix_identity(p) for p in prefixes]}
