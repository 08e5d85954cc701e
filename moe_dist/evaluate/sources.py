"""Evaluation data: documents from text files, `.jsonl`/`.json`/`.parquet` with an optional label
column, or Megatron `.bin/.idx` prefixes (with their label sidecars), as one token stream cut into
windows; or the validation split of a training config's data (`run_split_windows`).

Each source's documents are read in order (no shuffling, no sampling); the sources are
interleaved one document at a time, so a token budget covers every source. The documents are
concatenated, each followed by the end-of-document id, as training concatenates them. Window i
is stream[i*S : i*S + S + 1], so every token after the first is predicted exactly once, with up
to S tokens of context from its window. A window's `domain_ids` are the labels of its tokens
(-1: none): the inputs' labels feed the routing statistics, the targets' labels the per-domain
loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moe_dist.common.config import ConfigError
from moe_dist.data.labels import NO_LABEL, global_domain_ids, read_label_names
from moe_dist.data.text_sources import file_format, load_corpus
from moe_dist.data.tokenizer_record import check_prefix_tokenizer, describe_tokenizer, tokenizer_origin
from moe_dist.data.tokenizers import build_tokenizer


@dataclass
class Window:
    tokens: torch.Tensor  # int64 [n + 1]: n inputs, the same shifted by one as targets
    domain_ids: torch.Tensor  # int64 [n + 1], the label of each token (-1: none)


def is_megatron_prefix(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


def is_run_config(path: str) -> bool:
    return path.endswith((".yaml", ".yml"))


def check_sources(paths: Sequence[str]) -> None:
    """Every path is a Megatron prefix or a readable file of a known type (checked before any
    model is loaded)."""
    if not paths:
        raise ConfigError("no evaluation data given: expected at least one --data source")
    configs = [p for p in paths if is_run_config(p)]
    if configs and len(paths) > 1:
        raise ConfigError(f"a training config ({configs[0]!r}) must be the only --data source (its validation "
                          f"split is the data)")
    for path in paths:
        if is_megatron_prefix(path) or (is_run_config(path) and os.path.isfile(path)):
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"evaluation data {path!r} is neither a file nor a Megatron prefix "
                              f"({path}.bin and {path}.idx)")
        file_format(path)


def check_tokenizer(paths: Sequence[str], tokenizer, whose: str) -> None:
    """Refuse data whose token ids come from another tokenizer than `tokenizer` (`whose`: "checkpoint
    X's"): a Megatron prefix's `<prefix>.tokenizer.json`, a training config's `data.tokenizer` (text
    files are tokenized here, with `tokenizer` itself)."""
    for path in paths:
        if is_megatron_prefix(path):
            check_prefix_tokenizer("--data", path, tokenizer, whose)
        elif is_run_config(path):
            data = _run_data_config(path)
            theirs = build_tokenizer(data.tokenizer)
            if dict(theirs.unique_identifiers) != dict(tokenizer.unique_identifiers):
                raise ConfigError(f"--data {path!r} reads its data with data.tokenizer "
                                  f"{describe_tokenizer(theirs, tokenizer_origin(theirs))}, but {whose} tokenizer "
                                  f"is {describe_tokenizer(tokenizer, tokenizer_origin(tokenizer))}; evaluate on "
                                  f"data of the checkpoint's tokenizer")
            for i, prefix in enumerate(data.megatron.prefixes if data.megatron else []):
                check_prefix_tokenizer(f"--data {path!r}: data.megatron.prefixes[{i}]", prefix, tokenizer, whose)


def _run_data_config(path: str):
    """The `data` section of a training config, parsed (its tokenizer and files checked)."""
    import yaml

    from moe_dist.data.config import DataConfig

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path!r} is not a training config (a mapping of sections)")
    return DataConfig.from_dict(dict(raw.get("data") or {}))


def domain_names(paths: Sequence[str], label_key: str | None) -> list[str]:
    """The sorted union of the label names of every source (empty: no labels anywhere)."""
    names: set[str] = set()
    for path in paths:
        if is_megatron_prefix(path):
            names.update(read_label_names(path) or [])
        elif label_key and file_format(path) != "text":
            corpus = load_corpus([path], [label_key])
            names.update(str(v) for v in corpus[label_key] if v is not None)
    return sorted(names)


def documents(paths: Sequence[str], tokenizer, names: Sequence[str], *, text_key: str = "text",
              label_key: str | None = None, text_sample_by: str = "line") -> Iterator[tuple[list[int], int]]:
    """(token ids with the end-of-document id, domain id) per document: each source's documents in
    order, the sources interleaved one document at a time (a source that runs out drops out), so
    that a --tokens budget takes from every source (e.g. one file per language), not only the
    first."""
    sources = [_source_documents(path, tokenizer, names, text_key=text_key, label_key=label_key,
                                 text_sample_by=text_sample_by) for path in paths]
    while sources:
        for source in list(sources):
            doc = next(source, None)
            if doc is None:
                sources.remove(source)
            else:
                yield doc


def _source_documents(path: str, tokenizer, names: Sequence[str], *, text_key: str, label_key: str | None,
                      text_sample_by: str) -> Iterator[tuple[list[int], int]]:
    if is_megatron_prefix(path):
        yield from _megatron_documents(path, names)
        return
    index = {name: i for i, name in enumerate(names)}
    fmt = file_format(path)
    columns = [text_key] + ([label_key] if label_key and fmt != "text" else [])
    corpus = load_corpus([path], columns, text_sample_by=text_sample_by)
    for row in corpus:
        label = row.get(label_key) if label_key else None
        ids = tokenizer.tokenize(row[text_key])
        if ids:
            yield ids + [tokenizer.eod], NO_LABEL if label is None else index[str(label)]


def _megatron_documents(prefix: str, names: Sequence[str]) -> Iterator[tuple[list[int], int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    labels = global_domain_ids(prefix, names, len(indexed.sequence_lengths))
    for i in range(len(indexed)):
        yield np.asarray(indexed[i], dtype=np.int64).tolist(), int(labels[i])


def windows(docs: Iterator[tuple[list[int], int]], seq_len: int, max_targets: int | None) -> Iterator[Window]:
    """Windows of at most `seq_len` targets over the concatenated documents, until the stream
    ends or `max_targets` targets have been yielded (None: all)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens: list[int] = []
    labels: list[int] = []
    remaining = max_targets

    def take(n: int) -> Window:
        window = Window(torch.tensor(tokens[:n + 1]), torch.tensor(labels[:n + 1]))
        del tokens[:n], labels[:n]  # the last token stays: it is the next window's first input
        return window

    for ids, label in docs:
        tokens.extend(ids)
        labels.extend([label] * len(ids))
        while len(tokens) > seq_len and (remaining is None or remaining > 0):
            n = seq_len if remaining is None else min(seq_len, remaining)
            yield take(n)
            remaining = None if remaining is None else remaining - n
        if remaining is not None and remaining <= 0:
            return
    if len(tokens) > 1 and (remaining is None or remaining > 0):
        yield take(len(tokens) - 1 if remaining is None else min(len(tokens) - 1, remaining))


def run_split_windows(run_config_path: str, model_vocab_size: int, seq_len: int,
                      max_targets: int) -> tuple[list[str], Iterator[Window]]:
    """The validation split of a training config's data (synthetic or Megatron), as windows of
    its samples: (domain names, windows). A split has no end of its own, so `max_targets` is
    required; the samples are the trainer's validation samples, in order."""
    import yaml

    from moe_dist.data.config import DataConfig
    from moe_dist.data.pipeline import build_datasets

    with open(run_config_path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{run_config_path!r} is not a training config (a mapping of sections)")
    section = {**(raw.get("data") or {}), "seq_length": seq_len}
    num_samples = -(-max_targets // seq_len)
    data = build_datasets(DataConfig.from_dict(section), model_vocab_size, train_samples=1,
                          valid_samples=num_samples)
    if data.valid is None or len(data.valid) == 0:
        raise ConfigError(f"{run_config_path!r}: its data has no validation split (data.megatron.split)")

    def gen() -> Iterator[Window]:
        remaining = max_targets
        for i in range(min(len(data.valid), num_samples)):
            sample = data.valid[i]
            tokens = torch.as_tensor(sample["tokens"], dtype=torch.long)
            labels = torch.as_tensor(sample["domain_ids"], dtype=torch.long)
            labels = torch.cat([labels, labels[-1:]])  # the last target's label: its predecessor's
            n = min(seq_len, remaining)
            yield Window(tokens[:n + 1], labels[:n + 1])
            remaining -= n
            if remaining <= 0:
                return

    return list(data.domain_names), gen()
