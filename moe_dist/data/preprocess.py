"""Tokenize local corpora into Megatron-Core `.bin/.idx` files (logic of tools/preprocess_data.py).

One document per input row, each followed by the tokenizer's eod id, in input order. An
optional label column becomes the `<prefix>.labels.{npy,json}` sidecar (see labels.py), and
`<prefix>.tokenizer.json` records the tokenizer (tokenizer_record.py). All
outputs are staged under temporary names and renamed together only once complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase
from tqdm import tqdm

from moe_dist.common.atomic import check_output_file, make_output_folder, staged_files
from moe_dist.common.config import ConfigError
from moe_dist.data.jsonl_lines import first_bad_line
from moe_dist.data.labels import encode_labels, label_sidecar_paths, write_label_sidecars
from moe_dist.data.tokenizer_record import tokenizer_record_path, write_tokenizer_record
from moe_dist.data.text_sources import load_corpus


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    num_documents: int
    num_tokens: int
    dtype: str
    label_names: list[str] | None


class _DocumentEncoder:
    """The `datasets.map` function; a picklable object so that `num_proc` workers can run it."""

    def __init__(self, tokenizer: MegatronTokenizerBase, text_key: str) -> None:
        self.tokenizer = tokenizer
        self.text_key = text_key

    def __call__(self, batch: dict[str, list], row_indices: list[int]) -> dict[str, list]:
        ids = []
        for row, text in zip(row_indices, batch[self.text_key]):
            if not isinstance(text, str):
                raise TypeError(f"row {row}: column {self.text_key!r} must hold a string, "
                                f"got {type(text).__name__} ({text!r:.80})")
            ids.append(self.tokenizer.tokenize(text) + [self.tokenizer.eod])
        return {"ids": ids}


def _write_documents(builder: IndexedDatasetBuilder, ds, dtype: type, desc: str) -> int:
    num_tokens = 0
    with tqdm(total=len(ds), desc=desc, unit="doc") as progress:
        for batch in ds.iter(batch_size=1024):
            for ids in batch["ids"]:
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                num_tokens += len(ids)
            progress.update(len(batch["ids"]))
    return num_tokens


def preprocess_corpus(input_paths: Sequence[str], output_prefix: str,
                      tokenizer: MegatronTokenizerBase, text_key: str = "text",
                      label_key: str | None = None, workers: int = 1,
                      cache_dir: str | None = None,
                      text_sample_by: str = "line") -> PreprocessResult:
    """Write `<output_prefix>.bin/.idx` (+ label sidecars when `label_key` is given)."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if label_key == text_key:
        raise ConfigError(f"label_key and text_key must differ, both are {text_key!r}")
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    labels_npy, labels_json = label_sidecar_paths(output_prefix)
    record = tokenizer_record_path(output_prefix)
    # Readers open .idx first, so it is renamed last: until then the old dataset stays whole.
    finals = ([labels_npy, labels_json] if label_key else []) + [record, bin_path, idx_path]
    make_output_folder(bin_path)
    for path in finals:
        check_output_file(path)
    columns = [text_key] + ([label_key] if label_key else [])
    ds = load_corpus(input_paths, columns, cache_dir=cache_dir, text_sample_by=text_sample_by)
    try:
        ds = ds.map(_DocumentEncoder(tokenizer, text_key), batched=True, with_indices=True,
                    num_proc=min(workers, len(ds)) if workers > 1 else None,
                    remove_columns=[text_key], desc="tokenize")
    except TypeError as e:  # a row whose text is not a string: say which file and line
        located = first_bad_line(input_paths, text_key)
        raise ConfigError(located or str(e)) from None
    label_names, label_ids = encode_labels(ds[label_key]) if label_key else (None, None)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    with staged_files(finals) as staged:
        builder = IndexedDatasetBuilder(staged[bin_path], dtype=dtype)
        try:
            num_tokens = _write_documents(builder, ds, dtype, f"write {output_prefix}")
        finally:
            builder.data_file.close()
        builder.finalize(staged[idx_path])
        write_tokenizer_record(staged[record], tokenizer)
        if label_key:
            write_label_sidecars(staged[labels_npy], staged[labels_json], label_key,
                                 label_names, label_ids)
        else:
            # Sidecars of an earlier run would label the new documents wrongly.
            for stale in (labels_npy, labels_json):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
    return PreprocessResult(prefix=output_prefix, num_documents=len(ds), num_tokens=num_tokens,
                            dtype=dtype.__name__, label_names=label_names)
