"""A tiny Hugging Face tokenizer built locally (nothing downloaded): a byte-level BPE trained with
`tokenizers` on a few lines, wrapped in PreTrainedTokenizerFast and saved with save_pretrained,
with <s> / </s> / <unk>, one added token and a Llama-style post-processor that prepends <s> (so
`add_special_tokens` matters), as a model directory ships them."""

from __future__ import annotations

import json

LINES = [f"Line {i}: the quick brown fox {i % 7} jumps over {i * 3} lazy dogs, naïve café über alles." for i in range(80)]
ADDED = "<|sep|>"


def build_tokenizer_dir(path: str, vocab_size: int = 320, with_eos: bool = True) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(LINES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    specials = {"bos_token": "<s>", "eos_token": "</s>"} if with_eos else {"bos_token": "<s>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)
    fast.add_tokens([ADDED])
    fast.save_pretrained(path)
    return path


def write_jsonl(path: str, texts: list[str]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


def reference_ids(path: str, texts: list[str]) -> list[list[int]]:
    """What transformers' own tokenizer gives each text, end-of-document appended."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
