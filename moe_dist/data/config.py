"""Typed, strict configuration of the data pipeline (the `data:` section of a training config).

Everything that can be checked without reading a corpus is checked here, at parse time: key
names, value ranges, and that every file the run will open exists and is not empty. A typo or
a missing file must fail in the first second of a job, not after process groups are up.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from moe_dist.common.config import check, check_choice, check_int, from_dict
from moe_dist.data.labels import label_sidecar_paths

DATA_KINDS = ("synthetic", "megatron")
# The synthetic corpus writes printable ASCII (bytes 32..126), so its samples decode to text.
ALPHABET_FIRST, ALPHABET_SIZE = 32, 95
TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")
# One of these marks a directory as a Hugging Face tokenizer (what save_pretrained writes).
HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def check_nonempty_file(where: str, path: str) -> None:
    """Raise ConfigError unless `path` is an existing, non-empty regular file."""
    check(isinstance(path, str) and path != "", f"{where} must be a file path, got {path!r}")
    check(os.path.isfile(path), f"{where}: file {path!r} does not exist")
    check(os.path.getsize(path) > 0, f"{where}: file {path!r} is empty")


def check_hf_tokenizer_dir(where: str, path: str | None) -> None:
    """Raise ConfigError unless `path` is a directory with tokenizer.json or tokenizer_config.json."""
    check(isinstance(path, str) and path != "",
          f"{where} must name a Hugging Face tokenizer directory, got {path!r}")
    check(os.path.isdir(path), f"{where}: directory {path!r} does not exist")
    check(any(os.path.isfile(os.path.join(path, m)) for m in HF_TOKENIZER_MARKERS),
          f"{where}: directory {path!r} holds none of {list(HF_TOKENIZER_MARKERS)}; expected a Hugging Face "
          f"tokenizer saved with save_pretrained")


def parse_split(where: str, split: str) -> tuple[float, float]:
    """'98,2' -> (0.98, 0.02): the train and valid fractions of each prefix's documents."""
    check(isinstance(split, str), f"{where} must be a string like '98,2', got {split!r}")
    parts = split.split(",")
    numeric = all(re.fullmatch(r"\s*\d+(\.\d*)?\s*", p) for p in parts)
    check(len(parts) == 2 and numeric,
          f"{where} must be two non-negative numbers 'train,valid' like '98,2', got {split!r}")
    train, valid = (float(p) for p in parts)
    check(train > 0, f"{where}: the train part must be > 0, got {split!r}")
    return train / (train + valid), valid / (train + valid)


@dataclass
class TokenizerConfig:
    """`byte`: the built-in byte-level tokenizer (vocab 257); `sentencepiece`: a .model file;
    `hf`: a local Hugging Face tokenizer directory (`path`)."""

    kind: str = "byte"
    model: str | None = None
    # kind hf: the directory holding tokenizer.json / tokenizer_config.json (a model directory does).
    path: str | None = None
    # kind hf: lead every document with the tokenizer's bos_token (Llama-style pretraining).
    add_bos: bool = False

    def __post_init__(self) -> None:
        check_choice("data.tokenizer.kind", self.kind, TOKENIZER_KINDS)
        check(isinstance(self.add_bos, bool), f"data.tokenizer.add_bos must be true or false, got {self.add_bos!r}")
        if self.kind != "hf":
            check(self.path is None, f"data.tokenizer.path is only for kind 'hf' (a Hugging Face tokenizer "
                                     f"directory), got {self.path!r} with kind {self.kind!r}")
            check(not self.add_bos, f"data.tokenizer.add_bos is only for kind 'hf', got kind {self.kind!r}")
        if self.kind == "hf":
            check(self.model is None, f"data.tokenizer.model is for kind 'sentencepiece'; kind 'hf' reads "
                                      f"data.tokenizer.path, got model {self.model!r}")
            check_hf_tokenizer_dir("data.tokenizer.path", self.path)
        elif self.kind == "sentencepiece":
            check(self.model is not None,
                  "data.tokenizer.model must name a .model file when kind is 'sentencepiece'")
            check_nonempty_file("data.tokenizer.model", self.model)
        else:
            check(self.model is None,
                  f"data.tokenizer.model must be unset for the byte tokenizer, got {self.model!r}")


@dataclass
class MegatronDataConfig:
    """A weighted blend of preprocessed `.bin/.idx` prefixes (tools/preprocess_data.py)."""

    prefixes: list[str]
    # None: weight each prefix by its size, as Megatron-Core does.
    weights: list[float] | None = None
    split: str = "98,2"
    # None: Megatron-Core's default, a `cache/` folder beside each prefix.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check(isinstance(self.prefixes, (list, tuple)) and len(self.prefixes) > 0,
              f"data.megatron.prefixes must be a non-empty list of paths, got {self.prefixes!r}")
        self.prefixes = list(self.prefixes)
        for i, prefix in enumerate(self.prefixes):
            check_prefix_files(f"data.megatron.prefixes[{i}]", prefix)
        if self.weights is not None:
            check(isinstance(self.weights, (list, tuple))
                  and len(self.weights) == len(self.prefixes),
                  f"data.megatron.weights ({self.weights!r}) must hold one weight per prefix "
                  f"({len(self.prefixes)} prefixes)")
            for i, w in enumerate(self.weights):
                check(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0,
                      f"data.megatron.weights[{i}] must be a number > 0, got {w!r}")
            self.weights = [float(w) for w in self.weights]
        parse_split("data.megatron.split", self.split)
        check(self.cache_dir is None or (isinstance(self.cache_dir, str) and self.cache_dir),
              f"data.megatron.cache_dir must be a path or unset, got {self.cache_dir!r}")


def check_prefix_files(where: str, prefix: str) -> None:
    """A prefix needs non-empty .bin and .idx; label sidecars come as a pair or not at all."""
    check(isinstance(prefix, str) and prefix != "", f"{where} must be a path, got {prefix!r}")
    check_nonempty_file(where, prefix + ".bin")
    check_nonempty_file(where, prefix + ".idx")
    sidecars = label_sidecar_paths(prefix)
    present = [os.path.exists(p) for p in sidecars]
    check(all(present) or not any(present),
          f"{where}: label sidecars must both exist or both be absent, found only "
          f"{[p for p, ok in zip(sidecars, present) if ok]}")


@dataclass
class SyntheticDataConfig:
    """The built-in multi-domain corpus (moe_dist/data/synthetic.py)."""

    num_domains: int = 4
    # How many successors each symbol has in a domain's Markov chain: the per-token entropy.
    branching: int = 4
    min_doc_tokens: int = 16
    max_doc_tokens: int = 256

    def __post_init__(self) -> None:
        check_int("data.synthetic.num_domains", self.num_domains, 1)
        check_int("data.synthetic.branching", self.branching, 1)
        check(self.branching <= ALPHABET_SIZE,
              f"data.synthetic.branching ({self.branching}) must be <= the alphabet size "
              f"({ALPHABET_SIZE})")
        check_int("data.synthetic.min_doc_tokens", self.min_doc_tokens, 1)
        check_int("data.synthetic.max_doc_tokens", self.max_doc_tokens, self.min_doc_tokens)


@dataclass
class DataConfig:
    kind: str = "synthetic"
    seq_length: int = 128
    seed: int = 1234
    # DataLoader worker processes per rank (0: load in the training process).
    num_workers: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    megatron: MegatronDataConfig | None = None
    synthetic: SyntheticDataConfig | None = None

    def __post_init__(self) -> None:
        check_choice("data.kind", self.kind, DATA_KINDS)
        check_int("data.seq_length", self.seq_length, 1)
        check_int("data.seed", self.seed, 0)
        check_int("data.num_workers", self.num_workers, 0)
        check(isinstance(self.tokenizer, TokenizerConfig),
              f"data.tokenizer must be a mapping, got {self.tokenizer!r}")
        if self.kind == "megatron":
            check(isinstance(self.megatron, MegatronDataConfig),
                  f"data.megatron must be a mapping with 'prefixes' when kind is 'megatron', "
                  f"got {self.megatron!r}")
            check(self.synthetic is None,
                  "data.synthetic is only allowed when data.kind is 'synthetic'")
        else:
            check(self.megatron is None,
                  "data.megatron is only allowed when data.kind is 'megatron'")
            self.synthetic = self.synthetic or SyntheticDataConfig()
            check(isinstance(self.synthetic, SyntheticDataConfig),
                  f"data.synthetic must be a mapping, got {self.synthetic!r}")
            # The corpus is made of byte symbols, so only the byte tokenizer can read it back.
            check(self.tokenizer.kind == "byte",
                  f"data.kind 'synthetic' needs data.tokenizer.kind 'byte', "
                  f"got {self.tokenizer.kind!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "data") -> DataConfig:
        """The `data:` section of a config file; raises ConfigError on any bad value."""
        return from_dict(cls, data, where)
