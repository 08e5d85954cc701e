#!/usr/bin/env python
"""Tokenize local jsonl/json, txt or parquet files into Megatron-Core .bin/.idx files.

    python tools/preprocess_data.py --input fortunes_en.jsonl fortunes_de.jsonl \
        --output-prefix data/fortunes --tokenizer-model tok/fortunes.model \
        --workers 4 --label-key lang

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --hf-tokenizer models/Qwen3-0.6B

With --token-counts COUNTS.npy, also writes how often each token id occurs in the output (int64
[vocab size]): the `hash` router's `table: frequency` input (docs/routers/hash.md).

Appends eod to every document (a Hugging Face tokenizer's eos_token; --add-bos also leads each
document with its bos_token). With --label-key, also writes <prefix>.labels.npy (int32 label
id per document, -1 for none) and <prefix>.labels.json (label names). Outputs appear under
their final names only once complete. Bad input (a malformed jsonl line, a non-string text,
a file that is not a SentencePiece model, a missing column) exits 2 with `error: ...`. The
output folder is created when missing. <prefix>.tokenizer.json records the tokenizer, so that
training and evaluation with another one are refused.
"""

from __future__ import annotations

import argparse
import sys

from moe_dist.common.quiet import quiet_library_notices

quiet_library_notices(deepspeed=False)  # before Megatron-Core's import: its notices are not about this corpus

from moe_dist.common.atomic import check_output_file  # noqa: E402
from moe_dist.common.config import ConfigError  # noqa: E402
from moe_dist.data.config import TokenizerConfig  # noqa: E402
from moe_dist.data.preprocess import preprocess_corpus  # noqa: E402
from moe_dist.data.text_sources import add_corpus_arguments  # noqa: E402
from moe_dist.data.token_counts import count_tokens, write_token_counts  # noqa: E402
from moe_dist.data.tokenizers import build_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_corpus_arguments(p)
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file; omit for the built-in byte tokenizer")
    p.add_argument("--hf-tokenizer", default=None, metavar="DIR",
                   help="a local Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json)")
    p.add_argument("--add-bos", action="store_true",
                   help="with --hf-tokenizer: lead every document with the tokenizer's bos_token")
    p.add_argument("--label-key", default=None,
                   help="column with a per-document label (e.g. lang) for the label sidecar")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--token-counts", default=None, metavar="NPY",
                   help="also write each token id's count in the output (the hash router's frequency table)")
    return p.parse_args(argv)


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    if args.tokenizer_model and args.hf_tokenizer:
        raise ConfigError(f"give one tokenizer: --tokenizer-model {args.tokenizer_model!r} or --hf-tokenizer "
                          f"{args.hf_tokenizer!r}, not both")
    if args.add_bos and not args.hf_tokenizer:
        raise ConfigError("--add-bos needs --hf-tokenizer")
    if args.hf_tokenizer:
        return TokenizerConfig(kind="hf", path=args.hf_tokenizer, add_bos=args.add_bos)
    if args.tokenizer_model:
        return TokenizerConfig(kind="sentencepiece", model=args.tokenizer_model)
    return TokenizerConfig(kind="byte")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tokenizer = build_tokenizer(tokenizer_config(args))
        if args.token_counts:
            check_output_file(args.token_counts)
        result = preprocess_corpus(args.input, args.output_prefix, tokenizer,
                                   text_key=args.text_key, label_key=args.label_key,
                                   workers=args.workers, cache_dir=args.cache_dir,
                                   text_sample_by=args.text_sample_by)
        if args.token_counts:
            write_token_counts(args.token_counts, count_tokens([result.prefix], tokenizer.vocab_size))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    labels = f", labels {result.label_names}" if result.label_names is not None else ""
    print(f"wrote {result.prefix}.bin/.idx: {result.num_documents} documents, "
          f"{result.num_tokens} tokens ({result.dtype}){labels}")
    if args.token_counts:
        print(f"wrote token counts {args.token_counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
