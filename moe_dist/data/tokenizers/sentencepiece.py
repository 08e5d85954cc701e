"""A SentencePiece model (`tokenizer.kind: sentencepiece`, the .model file
tools/train_tokenizer.py writes) as a Megatron-Core tokenizer."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import sentencepiece

from moe_dist.common.config import ConfigError
from moe_dist.data.config import check_nonempty_file
from moe_dist.data.tokenizers.base import PretrainingTokenizer


class SentencePieceTokenizer(PretrainingTokenizer):
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
