#!/usr/bin/env python
"""Train a SentencePiece BPE/unigram tokenizer on local jsonl/json, txt or parquet files.

    python tools/train_tokenizer.py --input a.jsonl b.jsonl --output-prefix tok/fortunes \
        --vocab-size 8000 --model-type bpe --max-sentences 200000

Writes <output-prefix>.model (creating its folder); reads local files only, never downloads.
Bad input (a missing file or column, a vocabulary size the corpus cannot fill) exits 2 with one
`error:` line.
"""

from __future__ import annotations

import argparse
import sys

from moe_dist.common.config import ConfigError
from moe_dist.data.text_sources import add_corpus_arguments
from moe_dist.data.tokenizer_training import MODEL_TYPES, train_sentencepiece


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_arguments(p)
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--max-sentences", type=int, default=None,
                   help="train on a random subset of this many rows (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-sentences subset")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = train_sentencepiece(args.input, args.output_prefix, args.vocab_size,
                                   model_type=args.model_type, text_key=args.text_key,
                                   max_sentences=args.max_sentences, seed=args.seed,
                                   cache_dir=args.cache_dir, text_sample_by=args.text_sample_by)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
