"""Tokenizers usable by Megatron-Core's GPTDataset: SentencePiece (.model), built-in bytes, and a
local Hugging Face tokenizer directory (hf_tokenizer.py).

In megatron-core 0.16 `megatron.core.tokenizers.MegatronTokenizer` is only a factory (its
__init__ raises and `from_pretrained` reads a metadata.json); the class that GPTDatasetConfig
is typed against and whose abstract methods a tokenizer must provide is `MegatronTokenizerBase`
(tokenize, detokenize, vocab, vocab_size, apply_chat_template). Both classes here subclass it;
`eod` and `unique_identifiers` are what GPTDataset reads besides.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from moe_dist.common.config import ConfigError
from moe_dist.data.config import TokenizerConfig, check_nonempty_file


class _PretrainingTokenizer(MegatronTokenizerBase):
    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is a pretraining tokenizer and has no chat template")


class SentencePieceTokenizer(_PretrainingTokenizer):
    """A SentencePiece model; its end-of-sentence piece (`</s>`) serves as end-of-document."""

    def __init__(self, model_path: str) -> None:
        check_nonempty_file("sentencepiece model", model_path)
        super().__init__(model_path, {"library": "sentencepiece"})
        with open(model_path, "rb") as f:
            model_proto = f.read()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:  # sentencepiece reports a failed protobuf parse this way
            raise ConfigError(f"data.tokenizer.model {model_path!r} is not a SentencePiece model "
                              f"({len(model_proto)} bytes that do not parse as one: {str(e).strip()}); "
                              f"expected the .model file written by tools/train_tokenizer.py") from None
        # Content, not path: the cached sample indices stay valid if the model file moves.
        self._digest = hashlib.sha256(model_proto).hexdigest()
        if self._sp.eos_id() < 0:
            raise ConfigError(f"sentencepiece model {model_path!r} has no end-of-sentence piece "
                              f"(eos_id is {self._sp.eos_id()}); train it with eos_id >= 0")

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, sha256=self._digest)


class ByteTokenizer(_PretrainingTokenizer):
    """UTF-8 bytes as ids 0..255 and id 256 as end-of-document: no file, nothing to train."""

    EOD = 256

    def __init__(self) -> None:
        super().__init__("", {"library": "byte"})

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if i != self.EOD).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        return {**{f"<0x{i:02X}>": i for i in range(256)}, "<eod>": self.EOD}

    @property
    def vocab_size(self) -> int:
        return self.EOD + 1

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__)


def build_tokenizer(cfg: TokenizerConfig) -> MegatronTokenizerBase:
    if cfg.kind == "sentencepiece":
        return SentencePieceTokenizer(cfg.model)
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "hf":
        # Imported here: hf_tokenizer subclasses this module's base, and transformers is slow to import.
        from moe_dist.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(cfg.path, add_bos=cfg.add_bos)
    raise ValueError(f"tokenizer kind must be 'byte', 'sentencepiece' or 'hf', got {cfg.kind!r}")


def validate_tokenizer_vocab(tokenizer: MegatronTokenizerBase, model_vocab_size: int) -> None:
    """Every id the tokenizer can emit must have a row in the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size ({tokenizer.vocab_size}, {type(tokenizer).__name__}) is larger "
            f"than the model's vocab_size ({model_vocab_size}); set the model's vocab_size to at "
            f"least {tokenizer.vocab_size}")
