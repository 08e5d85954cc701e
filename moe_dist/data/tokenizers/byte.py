"""The built-in byte tokenizer (`tokenizer.kind: byte`): no file, nothing to train."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from moe_dist.data.tokenizers.base import PretrainingTokenizer


class ByteTokenizer(PretrainingTokenizer):
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
