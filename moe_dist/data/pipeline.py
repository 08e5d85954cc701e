"""The data entry point of training: config -> tokenizer and train/valid datasets.

Both kinds give datasets of the same samples, so build_dataloader (loader.py) shards and resumes
them the same way.
"""

from __future__ import annotations

from moe_dist.data.config import DataConfig
from moe_dist.data.datasets import TrainValidDatasets, build_megatron_datasets
from moe_dist.data.synthetic import TRAIN_STREAM, VALID_STREAM, SyntheticCorpus
from moe_dist.data.tokenizers import build_tokenizer, validate_tokenizer_vocab


def build_datasets(cfg: DataConfig, model_vocab_size: int, train_samples: int,
                   valid_samples: int) -> TrainValidDatasets:
    """The tokenizer and datasets of at least train_samples / valid_samples samples.

    The tokenizer is checked against the model's vocab_size before any index is built.
    """
    tokenizer = build_tokenizer(cfg.tokenizer)
    validate_tokenizer_vocab(tokenizer, model_vocab_size)
    if cfg.kind == "megatron":
        return build_megatron_datasets(cfg, tokenizer, train_samples, valid_samples)
    corpora = [SyntheticCorpus(cfg.synthetic, cfg.seq_length, n, cfg.seed, tokenizer.eod, stream)
               for n, stream in ((train_samples, TRAIN_STREAM), (valid_samples, VALID_STREAM))]
    return TrainValidDatasets(tokenizer=tokenizer, train=corpora[0], valid=corpora[1],
                              domain_names=corpora[0].domain_names)
