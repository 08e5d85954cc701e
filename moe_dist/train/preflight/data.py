"""Preflight's data checks: the domains the data will carry and, for Megatron-Core indexed data,
that every `.bin` has the size its `.idx` implies, every prefix gives each requested split at least
one document, and no token id reaches the vocabulary (moe_dist/data/index_check.py). They read
label sidecars and index headers, never build an index.
"""

from __future__ import annotations

from moe_dist.data.config import DataConfig
from moe_dist.data.datasets import blend_domain_names
from moe_dist.data.index_check import check_split_shares, check_token_ids, read_index


def data_domain_names(data: DataConfig) -> list[str]:
    """Domain names the data will carry, read from label sidecars (cheap: no index is built)."""
    if data.kind == "synthetic":
        return [f"domain{d}" for d in range(data.synthetic.num_domains)]
    return blend_domain_names(data.megatron.prefixes)


def check_megatron_data(data: DataConfig, tokenizer, model_vocab_size: int, train_samples: int,
                        valid_samples: int) -> None:
    """Index/size agreement, documents per split share, largest token id; reads each .idx and
    at most FULL_SCAN_BYTES (else a sample) of each .bin."""
    if data.kind != "megatron":
        return
    limit = min(tokenizer.vocab_size, model_vocab_size)
    limit_name = (f"the tokenizer's vocab_size ({type(tokenizer).__name__}, data.tokenizer.kind "
                  f"{data.tokenizer.kind!r}; model.vocab_size {model_vocab_size})")
    requested = {"train": train_samples, "valid": valid_samples}
    for i, prefix in enumerate(data.megatron.prefixes):
        where = f"data.megatron.prefixes[{i}]"
        summary = read_index(where, prefix)
        check_split_shares(where, summary, data.megatron.split, requested)
        check_token_ids(where, summary, limit, limit_name)
