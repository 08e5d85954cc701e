"""Train a SentencePiece BPE or unigram model on local corpora (logic of tools/train_tokenizer.py).

The options make detokenize(tokenize(text)) == text for any text: no normalization, whitespace
kept as is, and byte fallback so that characters unseen in training still encode (as bytes).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import datasets
import sentencepiece

from moe_dist.common.atomic import check_output_file, make_output_folder, staged_files
from moe_dist.data.text_sources import load_corpus

MODEL_TYPES = ("bpe", "unigram")
# Ids 0..2 are <unk>, <s>, </s>; then 2 user symbols and 256 byte-fallback pieces.
_USER_SYMBOLS = ["\n", "\t"]
MIN_VOCAB_SIZE = 3 + len(_USER_SYMBOLS) + 256 + 1
_TRAINER_OPTIONS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=_USER_SYMBOLS,
    character_coverage=0.9995,
    # We cap sentences ourselves (max_sentences); 0 = let sentencepiece take all it gets.
    input_sentence_size=0,
    max_sentence_length=1 << 20,
    # With small corpora a unigram model may not reach vocab_size; take what it finds.
    hard_vocab_limit=False,
    minloglevel=2,
)


def _sentences(ds: datasets.Dataset, text_key: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=1024):
        for text in batch[text_key]:
            if isinstance(text, str) and text:
                yield text


def train_sentencepiece(input_paths: Sequence[str], output_prefix: str, vocab_size: int,
                        model_type: str = "bpe", text_key: str = "text",
                        max_sentences: int | None = None, seed: int = 0,
                        cache_dir: str | None = None, text_sample_by: str = "line") -> str:
    """Train on the `text_key` column of `input_paths`; return the path `<output_prefix>.model`."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= {MIN_VOCAB_SIZE}: 256 byte "
                         f"pieces + special and user symbols + at least one learned piece")
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1 or None, got {max_sentences}")
    model_path = output_prefix + ".model"
    make_output_folder(model_path)
    check_output_file(model_path)
    ds = load_corpus(input_paths, [text_key], cache_dir=cache_dir, text_sample_by=text_sample_by)
    if max_sentences is not None and max_sentences < len(ds):
        # A random subset, not the first rows: with several files the first rows all come
        # from the first file (e.g. one language only).
        ds = ds.shuffle(seed=seed).select(range(max_sentences))
    model_bytes = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_sentences(ds, text_key), model_writer=model_bytes, vocab_size=vocab_size,
            model_type=model_type, **_TRAINER_OPTIONS)
    except RuntimeError as e:
        # Mostly "vocab_size smaller than the required characters"; say which run failed.
        raise ValueError(f"sentencepiece {model_type} training with vocab_size {vocab_size} on "
                         f"{list(input_paths)} failed: {e}") from e
    with staged_files([model_path]) as staged:
        with open(staged[model_path], "wb") as f:
            f.write(model_bytes.getvalue())
    return model_path
