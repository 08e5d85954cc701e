#!/usr/bin/env python
"""Train a SentencePiece BPE/unigram tokenizer on local jsonl/json, txt or parquet files.

    python tools/train_tokenizer.py --input a.jsonl b.jsonl --output-prefix tok/fortunes \
        --vocab-size 8000 --model-type bpe --max-sentences 200000

Writes <output-prefix>.model; reads local files only, never downloads.
"""

from __future__ import annotations

import argparse
import sys

from moe_dist.data.text_sources import TEXT_SAMPLE_BY
from moe_dist.data.tokenizer_training import MODEL_TYPES, train_sentencepiece


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="local .jsonl/.json/.txt/.parquet")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--text-key", default="text", help="column holding the text (json/parquet)")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on a random subset of this many rows (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-sentences subset")
    p.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default="line",
                   help="what one row of a .txt file is")
    p.add_argument("--cache-dir", default=None, help="Hugging Face datasets cache folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = train_sentencepiece(args.input, args.output_prefix, args.vocab_size,
                               model_type=args.model_type, text_key=args.text_key,
                               max_sentences=args.max_sentences, seed=args.seed,
                               cache_dir=args.cache_dir, text_sample_by=args.text_sample_by)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
