#!/usr/bin/env python
"""Text from a training or consolidated checkpoint, in one process (any EP size it was trained at).

    python tools/generate.py runs/tiny_cpu/checkpoints --prompt "abc" --prompt "" --max-new-tokens 80
    python tools/generate.py out/consolidated --prompts-file prompts.txt --temperature 0.8 --top-p 0.9 --seed 1
    python tools/generate.py runs/tiny_cpu/checkpoints --prompt "abc" --json out.json

Greedy by default (--temperature 0); with a temperature, tokens are drawn from the softmax,
optionally restricted to the top k (--top-k) and to the smallest set reaching probability p
(--top-p), reproducibly for a --seed. Prompts of different lengths run as one left-padded batch
(each computes what it computes alone); a sequence stops at end-of-document (unless
--no-stop-at-eod) or after --max-new-tokens. An empty prompt starts a new document. A KV cache
makes each new token cost one token's work plus attention over the context (--no-cache
recomputes everything, for checking). The MoE layers are dropless, the function the Hugging Face
exports compute, so greedy output equals theirs. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_dist.common.config import ConfigError
from moe_dist.common.quiet import quiet_library_notices

# torch, DeepSpeed and Megatron-Core are imported after the options are parsed (run, main): --help
# and a bad option answer at once.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="training checkpoint directory or consolidated directory")
    p.add_argument("--tag", default=None, help="tag of a training checkpoint (default: its latest)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with probability p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop-at-eod", action="store_true", help="keep generating past end-of-document")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at each step")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece model, if it moved since training")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="[{prompt, ids, text}] as JSON, written to PATH (no PATH: to stdout, instead of the text)")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f]
        except OSError as e:
            raise ConfigError(f"--prompts-file {args.prompts_file!r}: {e.strerror}") from None
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt. Decoded with the prompt, not alone: SentencePiece
    drops the leading space of a decode (the '▁' of its first piece), so a continuation decoded on
    its own would run into the prompt ('Life is' + 'good' for 'Life is good')."""
    prompt_text = tokenizer.detokenize(prompt_ids)
    whole = tokenizer.detokenize(list(prompt_ids) + list(new_ids))
    if whole.startswith(prompt_text):
        return whole[len(prompt_text):]
    return tokenizer.detokenize(new_ids)  # a prompt ending inside a multi-byte character


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from moe_dist.checkpoint.consolidated import open_checkpoint
    from moe_dist.evaluate.loading import checkpoint_tokenizer, load_model
    from moe_dist.model.generation import SamplingConfig, generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = read_prompts(args)
    ckpt = open_checkpoint(args.checkpoint, args.tag)  # cheap checks first
    tokenizer = checkpoint_tokenizer(ckpt.config, args.tokenizer_model)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed,
                              eos_id=None if args.no_stop_at_eod else tokenizer.eod)
    ids = [tokenizer.tokenize(p) or [tokenizer.eod] for p in prompts]
    vocab = ckpt.model_cfg.vocab_size
    for text, p in zip(prompts, ids):
        if max(p) >= vocab:
            raise ConfigError(f"prompt {text!r} has token id {max(p)}, outside the model's vocab_size {vocab}")
    model = load_model(args.checkpoint, tag=args.tag, device=device).model
    new = generate(model, ids, sampling, pad_id=tokenizer.eod, use_cache=not args.no_cache)
    # An empty prompt is the end-of-document id alone: nothing of it is text.
    return [{"prompt": text, "ids": out, "text": continuation_text(tokenizer, p if text else [], out)}
            for text, p, out in zip(prompts, ids, new)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_library_notices()
    from moe_dist.checkpoint.files import CheckpointError

    try:
        if args.json not in (None, "-"):
            from moe_dist.common.atomic import check_output_file, make_output_folder

            make_output_folder(args.json)
            check_output_file(args.json)  # before the model is loaded
        results = run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(results, ensure_ascii=False, indent=1))
    elif args.json:
        from moe_dist.common.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, ensure_ascii=False, indent=1) + "\n")
    else:
        for r in results:
            print(f"--- {r['prompt']!r}\n{r['prompt']}{r['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
