"""The tokenizer side of a Hugging Face export.

A checkpoint trained with a SentencePiece model gets `tokenizer.model` (the same file, checked
against the digest the trainer recorded) and the fast `tokenizer.json` that transformers'
`LlamaTokenizer` converts it to (BPE or unigram, byte fallback, no BOS/EOS added). It reproduces
moe_dist's ids except at the very start of a text that begins with whitespace: SentencePiece
always adds its dummy-prefix piece there, while transformers skips the prefix when the text
already starts with a space (one piece fewer).
Decoding is identical. The built-in byte tokenizer has no transformers counterpart: the export
records its special ids in config.json (end-of-document 256) and writes no tokenizer files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from moe_dist.checkpoint.files import CheckpointError, write_json

# moe_dist.data.tokenizer.BYTE_EOD; not imported: that module pulls in Megatron-Core.
BYTE_EOD = 256


def sentencepiece_model(tokenizer: dict[str, Any], recorded: dict[str, Any] | None, override: str | None) -> str | None:
    """Path of the SentencePiece model to export (None for the byte tokenizer), verified against
    the sha256 the trainer recorded when it has one."""
    if tokenizer.get("kind") != "sentencepiece":
        return None
    path = override or tokenizer.get("model")
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"the checkpoint's tokenizer is the SentencePiece model {tokenizer.get('model')!r}, "
                              f"which does not exist here{f' (nor {override!r})' if override else ''}; pass "
                              f"--tokenizer-model PATH")
    digest = ((recorded or {}).get("unique_identifiers") or {}).get("sha256")
    if digest is not None:
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != digest:
            raise CheckpointError(f"SentencePiece model {path!r} has sha256 {actual}, but the checkpoint was "
                                  f"trained with one whose sha256 is {digest}")
    return path


def special_token_ids(sp_model: str | None) -> dict[str, int | None]:
    if sp_model is None:
        return {"bos_token_id": None, "eos_token_id": BYTE_EOD, "pad_token_id": None}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    return {k: (v if v >= 0 else None) for k, v in
            (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id()))}


def write_tokenizer(sp_model: str | None, out_dir: str, max_length: int) -> None:
    """tokenizer.json (+ tokenizer_config.json) as transformers' LlamaTokenizer converts the
    SentencePiece model, and the model itself as tokenizer.model. The fast tokenizer.json is what
    makes AutoTokenizer right whatever config.json's model_type maps to (for `mixtral` it picks
    the generic TokenizersBackend, which reads only tokenizer.json)."""
    if sp_model is None:
        return
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        raise CheckpointError("exporting a SentencePiece tokenizer needs transformers: pip install "
                              "'moe_dist[hf]'") from None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    with tempfile.TemporaryDirectory() as src:
        shutil.copyfile(sp_model, os.path.join(src, "tokenizer.model"))
        write_json(os.path.join(src, "tokenizer_config.json"), {
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
            "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()), "clean_up_tokenization_spaces": False})
        tokenizer = LlamaTokenizer.from_pretrained(src)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))
