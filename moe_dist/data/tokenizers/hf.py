"""A local Hugging Face tokenizer directory (`tokenizer.kind: hf`) as a Megatron-Core tokenizer, so
continued pretraining and upcycling use the source model's own vocabulary and special tokens.

Documents are encoded as the SentencePiece kind encodes them: the text's ids without the special
tokens the tokenizer's post-processor would add, then end-of-document = the tokenizer's
`eos_token_id` (appended by preprocessing). With `add_bos` the tokenizer's `bos_token_id` leads
every document, as Llama models saw in pretraining; Qwen models have no BOS and train without.
The vocabulary size is `len(tokenizer)`: the base vocabulary plus added tokens, every id the
tokenizer can emit.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence

from moe_dist.common.config import ConfigError
from moe_dist.data.tokenizers.base import PretrainingTokenizer

# What a tokenizer directory may hold that decides the ids (a model directory also holds
# gigabytes of weights, which must not be hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def tokenizer_digest(path: str) -> str:
    """sha256 over the tokenizer files of `path` (names and contents): cached sample indices stay
    valid when the directory moves, and a changed vocabulary is noticed."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            h.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class HFTokenizer(PretrainingTokenizer):
    """`AutoTokenizer.from_pretrained(path, local_files_only=True)`; nothing is downloaded. A directory
that does not load, or a tokenizer without the special tokens needed, is a ConfigError naming it."""

    def __init__(self, path: str, add_bos: bool = False) -> None:
        super().__init__(path, {"library": "huggingface"})
        # Quiet fork warnings of the Rust tokenizer under `datasets.map(num_proc=...)`.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # OSError, ValueError, JSONDecodeError, ... by what is wrong
            raise ConfigError(f"data.tokenizer.path {path!r}: cannot load a Hugging Face tokenizer from this "
                             f"directory ({type(e).__name__}: {str(e).strip()[:300]}); expected the "
                             f"tokenizer.json / tokenizer_config.json that save_pretrained writes") from None
        self.path = path
        self.add_bos = add_bos
        if self._tok.eos_token_id is None:
            raise ConfigError(f"Hugging Face tokenizer {path!r} has no eos_token, which moe_dist appends as "
                             f"end-of-document; set eos_token in its tokenizer_config.json")
        if add_bos and self._tok.bos_token_id is None:
            raise ConfigError(f"data.tokenizer.add_bos is true but the Hugging Face tokenizer {path!r} has no "
                             f"bos_token; set add_bos: false or a bos_token in its tokenizer_config.json")
        self._digest = tokenizer_digest(path)

    def tokenize(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return [self._tok.bos_token_id, *ids] if self.add_bos else list(ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    @property
    def vocab_size(self) -> int:
        # len(): the base vocabulary's `vocab_size` leaves out added tokens the tokenizer emits.
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def bos(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, sha256=self._digest, add_bos=self.add_bos)
