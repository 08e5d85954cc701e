"""Tokenizers usable by Megatron-Core's GPTDataset: the built-in bytes (byte.py), a SentencePiece
model (sentencepiece.py) and a local Hugging Face tokenizer directory (hf.py), all on base.py's
class; build.py picks one from a `data.tokenizer` section.

Importing this package imports Megatron-Core. Training a SentencePiece model needs none of it and
lives in `moe_dist.data.tokenizer_training`.
"""

from moe_dist.data.tokenizers.base import PretrainingTokenizer
from moe_dist.data.tokenizers.build import build_tokenizer, validate_tokenizer_vocab
from moe_dist.data.tokenizers.byte import ByteTokenizer
from moe_dist.data.tokenizers.hf import HFTokenizer
from moe_dist.data.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["PretrainingTokenizer", "build_tokenizer", "validate_tokenizer_vocab", "ByteTokenizer", "HFTokenizer",
           "SentencePieceTokenizer"]
