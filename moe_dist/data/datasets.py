"""Train/valid datasets from `.bin/.idx` prefixes through Megatron-Core's builder, with domains.

`DomainGPTDataset` is Megatron-Core's GPTDataset (same documents, sample and shuffle indices,
same cache) whose samples are {"tokens": int64 [S+1], "domain_ids": int64 [S], "loss_mask":
int64 [S], "segment_ids": int64 [S]}: domain_ids[s] is the label of the document that tokens[s]
came from (-1 where the prefix has no labels); loss_mask and segment_ids: `padding_and_documents`.
GPTDataset's own __getitem__ is bypassed because it also builds an [S, S] attention mask per
sample, which the model does not use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from moe_dist.data.config import DataConfig
from moe_dist.data.labels import NO_LABEL, global_domain_ids, read_label_names


@dataclass
class DomainGPTDatasetConfig(GPTDatasetConfig):
    # The sorted union of label names over the blend: domain id i is domain_names[i].
    domain_names: tuple[str, ...] = ()


class DomainGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config: DomainGPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)
        self.document_domain_ids = global_domain_ids(
            dataset_path, config.domain_names, len(indexed_dataset.sequence_lengths))

    def _token_document_ids(self, idx: int) -> np.ndarray:
        """int64 [S+1]: the document of every token of sample idx, walking the same sample
        index as GPTDataset._query_document_sample_shuffle_indices."""
        sample = self.shuffle_index[idx]
        doc_beg, offset_beg = self.sample_index[sample]
        doc_end, offset_end = self.sample_index[sample + 1]
        docs = np.asarray(self.document_index[doc_beg : doc_end + 1], dtype=np.int64)
        lengths = self.dataset.sequence_lengths[docs].astype(np.int64)
        # The last document is cut after offset_end (+1 extra token); the first starts at
        # offset_beg (both apply when the sample lies inside one document).
        lengths[-1] = offset_end + self.config.add_extra_token_to_sequence
        lengths[0] -= offset_beg
        token_docs = np.full(self.config.sequence_length + 1, NO_LABEL, dtype=np.int64)
        flat = np.repeat(docs, lengths)
        token_docs[: len(flat)] = flat
        return token_docs

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens, _ = self._query_document_sample_shuffle_indices(idx)
        all_docs = self._token_document_ids(idx)
        token_docs = all_docs[:-1]
        domain_ids = np.where(token_docs >= 0, self.document_domain_ids[token_docs], NO_LABEL)
        return {"tokens": tokens.astype(np.int64, copy=False), "domain_ids": domain_ids,
                **padding_and_documents(all_docs)}


def padding_and_documents(token_docs: np.ndarray) -> dict[str, np.ndarray]:
    """From the document of each of a sample's S+1 tokens (-1: the padding GPTDataset appends to
    a short sample): `loss_mask` [S], 1 where position s predicts a real token (Megatron's loss
    mask; padding is neither predicted nor routed), and `segment_ids` [S], the document of
    tokens[s] numbered from 0 within the sample (MoESideInputs.segment_ids_T)."""
    loss_mask = (token_docs[1:] >= 0).astype(np.int64)
    inputs = token_docs[:-1]
    segment_ids = np.concatenate([[0], np.cumsum(inputs[1:] != inputs[:-1])]).astype(np.int64)
    return {"loss_mask": loss_mask, "segment_ids": segment_ids}


class _Builder(BlendedMegatronDatasetBuilder):
    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        # BlendedDataset, on a cache miss, calls torch.distributed.get_rank(), which raises in
        # a single process without a process group. Its index is one cheap C++ pass, so it is
        # built in memory (path_to_cache=None) on every rank instead; GPTDataset indices, the
        # costly ones, stay cached.
        if cls is BlendedDataset:
            *head, config = args
            args = (*head, dataclasses.replace(config, path_to_cache=None))
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args)


@dataclass(frozen=True)
class TrainValidDatasets:
    tokenizer: MegatronTokenizerBase
    train: torch.utils.data.Dataset
    # None when the split gives validation nothing.
    valid: torch.utils.data.Dataset | None
    # domain_ids index this list; -1 means unlabelled.
    domain_names: list[str]


def blend_domain_names(prefixes: list[str]) -> list[str]:
    names = set()
    for prefix in prefixes:
        names.update(read_label_names(prefix) or [])
    return sorted(names)


def blend_weights(prefixes: list[str], weights: list[float] | None) -> list[float] | None:
    """The configured weights, or else each prefix's token count. Megatron-Core weights an
    unweighted blend the same way but then stops after one epoch of the blend; explicit
    weights make it repeat data until the requested number of samples is reached."""
    if len(prefixes) == 1:
        return None  # no blend: Megatron-Core builds one GPTDataset of the requested size
    if weights is not None:
        return list(weights)
    return [_num_tokens(prefix) for prefix in prefixes]


def _num_tokens(prefix: str) -> float:
    # Keep the IndexedDataset alive while reading: sequence_lengths is a view into its mmap,
    # which its __del__ closes (reading it afterwards segfaults).
    indexed = IndexedDataset(prefix)
    return float(indexed.sequence_lengths.sum())


def build_megatron_datasets(cfg: DataConfig, tokenizer: MegatronTokenizerBase,
                            train_samples: int, valid_samples: int) -> TrainValidDatasets:
    """At least `train_samples` / `valid_samples` samples of cfg.seq_length + 1 tokens.

    Every rank builds the same datasets (rank 0 first when torch.distributed is initialized, as
    Megatron-Core does); ranks then read disjoint slices through loader.build_dataloader.
    """
    if cfg.megatron is None:
        raise ValueError(f"data.kind is {cfg.kind!r}; Megatron datasets need kind 'megatron'")
    if train_samples < 1 or valid_samples < 0:
        raise ValueError(f"train_samples ({train_samples}) must be >= 1 and valid_samples "
                         f"({valid_samples}) >= 0")
    prefixes = cfg.megatron.prefixes
    domain_names = blend_domain_names(prefixes)
    config = DomainGPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, blend_weights(prefixes, cfg.megatron.weights)),
        split=cfg.megatron.split,
        path_to_cache=cfg.megatron.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        domain_names=tuple(domain_names),
    )
    # The test split is not used; its size must still be a number, not None, with weights.
    sizes = [train_samples, valid_samples, 0]
    # Built on every rank (is_built_on_rank -> True): each data-parallel rank reads its slices.
    train, valid, _ = _Builder(DomainGPTDataset, sizes, lambda: True, config).build()
    if len(train) < train_samples:
        raise RuntimeError(f"built {len(train)} train samples, fewer than the {train_samples} "
                           f"requested")
    return TrainValidDatasets(tokenizer=tokenizer, train=train, valid=valid,
                              domain_names=domain_names)
