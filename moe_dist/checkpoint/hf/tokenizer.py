"""What makes an export behave like a Hugging Face model in `generate` besides the weights: the
byte tokenizer as a transformers tokenizer, a pad token for every tokenizer, and
generation_config.json naming end-of-document and padding.

The byte tokenizer (ids 0..255 = UTF-8 bytes, 256 = end-of-document) is written as a `tokenizers`
byte-level BPE with no merges whose 256 base symbols are the bytes in id order, so the ids are
moe_dist's exactly; `<|endoftext|>` is id 256. Neither tokenizer has a dedicated padding piece
in the model's vocabulary, so the end-of-document token pads (the attention mask keeps padding
out of every real token's computation; a row's padding is never attended to). Tokenizers pad on
the left, as decoder-only generation wants. The tokenizer class is transformers' own
(`PreTrainedTokenizerFast`, no `auto_map`), so `AutoTokenizer` runs no custom code and never asks
whether to.
"""

from __future__ import annotations

import os
from typing import Any

from moe_dist.checkpoint.files import CheckpointError, write_json

BYTE_EOD_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte: what the ByteLevel pre-tokenizer emits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(out_dir: str, max_length: int) -> None:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise CheckpointError("exporting the tokenizer needs transformers: pip install 'moe_dist[hf]'") from None
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOD_TOKEN, special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_EOD_TOKEN, pad_token=BYTE_EOD_TOKEN,
                                   padding_side="left", model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)


def pad_token_ids(token_ids: dict[str, int | None], vocab_size: int) -> dict[str, int | None]:
    """The special ids with a pad id: the tokenizer's own, else end-of-document, if the model's
    vocabulary holds it (transformers builds its embedding with `padding_idx` = pad id)."""
    eos = token_ids.get("eos_token_id")
    if token_ids.get("pad_token_id") is None and eos is not None and eos < vocab_size:
        return {**token_ids, "pad_token_id": eos}
    return dict(token_ids)


def write_generation_config(out_dir: str, token_ids: dict[str, int | None]) -> None:
    config: dict[str, Any] = {k: v for k, v in token_ids.items() if v is not None}
    write_json(os.path.join(out_dir, "generation_config.json"), {**config, "_from_model_config": False})
