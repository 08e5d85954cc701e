"""The tokenizer a `data.tokenizer` section names, and the check that the model can read its ids."""

from __future__ import annotations

from megatron.core.tokenizers import MegatronTokenizerBase

from moe_dist.data.config import TokenizerConfig
from moe_dist.data.tokenizers.byte import ByteTokenizer
from moe_dist.data.tokenizers.hf import HFTokenizer
from moe_dist.data.tokenizers.sentencepiece import SentencePieceTokenizer


def build_tokenizer(cfg: TokenizerConfig) -> MegatronTokenizerBase:
    if cfg.kind == "sentencepiece":
        return SentencePieceTokenizer(cfg.model)
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        return HFTokenizer(cfg.path, add_bos=cfg.add_bos)
    raise ValueError(f"tokenizer kind must be 'byte', 'sentencepiece' or 'hf', got {cfg.kind!r}")


def validate_tokenizer_vocab(tokenizer: MegatronTokenizerBase, model_vocab_size: int) -> None:
    """Every id the tokenizer can emit must have a row in the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size ({tokenizer.vocab_size}, {type(tokenizer).__name__}) is larger "
            f"than the model's vocab_size ({model_vocab_size}); set the model's vocab_size to at "
            f"least {tokenizer.vocab_size}")
