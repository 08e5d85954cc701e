"""The language-model corpora of the study: the multilingual fortunes (one token stream per
language, language = domain label) and tiny-shakespeare (one unlabelled stream), tokenized once
before the runs and saved as token streams that every run loads.

Legend: B sequences, S sequence length.

Tokenizers: bytes, with the ids of `moe_dist.data.tokenizers.ByteTokenizer` (UTF-8 bytes 0..255,
256 ends a document; written out here because importing that package pulls in Megatron-Core,
whose slow import every study worker would then pay), or a SentencePiece BPE model trained in
the run on the training documents only, with the project's trainer
(`moe_dist.data.tokenizer_training`). Batches are windows drawn from the streams directly (no
.bin/.idx preprocessing), each from a uniformly drawn domain, so every language gets the same
share of the training tokens whatever its corpus size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor

BYTE_EOD = 256
BYTE_VOCAB = 257
FORTUNE_LANGUAGES = ("de", "en", "es")  # sorted, as moe_dist.data.labels names domains
VALID_EVERY = 20  # fortunes: every 20th document of each file is held out (all collections in both)
SHAKESPEARE_VALID_FRACTION = 0.1  # the last 10% of the play text, the usual char-level split


@dataclass(frozen=True)
class TextCorpus:
    name: str
    train_docs: tuple[tuple[str, ...], ...]  # documents per domain
    valid_docs: tuple[tuple[str, ...], ...]
    domain_names: tuple[str, ...]  # () when the corpus has no labels


@dataclass(frozen=True)
class Corpus:
    name: str
    train: tuple[Tensor, ...]  # int64 token stream per domain
    valid: tuple[Tensor, ...]
    domain_names: tuple[str, ...]
    vocab_size: int
    tokenizer: str  # "byte" or "sentencepiece <vocab>"


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} does not exist (pass --data-dir, the folder "
                                f"holding fortunes_{{de,en,es}}.jsonl and tinyshakespeare.txt)")


def read_fortunes(data_dir: str) -> TextCorpus:
    train, valid = [], []
    for lang in FORTUNE_LANGUAGES:
        path = os.path.join(data_dir, f"fortunes_{lang}.jsonl")
        _check_file(path)
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        if len(texts) < VALID_EVERY:
            raise ValueError(f"{path!r} holds {len(texts)} documents; need >= {VALID_EVERY} for a validation split")
        valid.append(tuple(texts[VALID_EVERY - 1::VALID_EVERY]))
        train.append(tuple(t for i, t in enumerate(texts) if (i + 1) % VALID_EVERY))
    return TextCorpus("fortunes", tuple(train), tuple(valid), FORTUNE_LANGUAGES)


def read_shakespeare(data_dir: str) -> TextCorpus:
    path = os.path.join(data_dir, "tinyshakespeare.txt")
    _check_file(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * (1.0 - SHAKESPEARE_VALID_FRACTION))
    return TextCorpus("shakespeare", ((text[:cut],),), ((text[cut:],),), ())


READERS = {"fortunes": read_fortunes, "shakespeare": read_shakespeare}


def _stream(docs: tuple[str, ...], encode, eod: int) -> Tensor:
    ids: list[int] = []
    for doc_ids in encode(list(docs)):
        ids.extend(doc_ids)
        ids.append(eod)
    return torch.tensor(ids, dtype=torch.int64)


def _byte_encode(texts: list[str]) -> list[bytes]:
    return [t.encode("utf-8") for t in texts]


def _train_sentencepiece(text: TextCorpus, vocab_size: int, work_dir: str):
    """A BPE model trained on the training documents (never the validation ones)."""
    import sentencepiece

    from moe_dist.data.tokenizer_training import train_sentencepiece

    docs_path = os.path.join(work_dir, f"{text.name}_train_docs.jsonl")
    with open(docs_path, "w", encoding="utf-8") as f:
        for docs in text.train_docs:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    model_path = train_sentencepiece([docs_path], os.path.join(work_dir, f"{text.name}_sp{vocab_size}"), vocab_size,
                                     "bpe", cache_dir=os.path.join(work_dir, "hf_cache"))
    return sentencepiece.SentencePieceProcessor(model_file=model_path)


def prepare_corpus(name: str, data_dir: str, work_dir: str, sentencepiece_vocab: int | None) -> str:
    """Tokenize corpus `name` (bytes, or a SentencePiece model of `sentencepiece_vocab` pieces
    trained here) and save its streams; returns the file every run of that corpus loads."""
    if name not in READERS:
        raise ValueError(f"corpus must be one of {sorted(READERS)}, got {name!r}")
    os.makedirs(work_dir, exist_ok=True)
    text = READERS[name](data_dir)
    if sentencepiece_vocab is None:
        encode, eod, vocab, kind = _byte_encode, BYTE_EOD, BYTE_VOCAB, "byte"
    else:
        sp = _train_sentencepiece(text, sentencepiece_vocab, work_dir)
        encode, eod, vocab, kind = sp.encode, sp.eos_id(), sp.vocab_size(), f"sentencepiece {sp.vocab_size()}"
    path = os.path.join(work_dir, f"{name}_tokens.pt")
    torch.save({"name": name, "domain_names": text.domain_names, "vocab_size": vocab, "tokenizer": kind,
                "train": [_stream(d, encode, eod) for d in text.train_docs],
                "valid": [_stream(d, encode, eod) for d in text.valid_docs]}, path)
    return path


def load_corpus(path: str) -> Corpus:
    saved = torch.load(path)
    return Corpus(saved["name"], tuple(saved["train"]), tuple(saved["valid"]), tuple(saved["domain_names"]),
                  saved["vocab_size"], saved["tokenizer"])


def _windows(streams: tuple[Tensor, ...], domain_B: Tensor, start_B: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """(tokens_BS1 [B, S+1], domain_BS [B, S])."""
    offsets = torch.arange(seq_len + 1)
    tokens = torch.stack([streams[int(d)][int(s) + offsets] for d, s in zip(domain_B, start_B)])
    return tokens, domain_B[:, None].expand(-1, seq_len).contiguous()


def _check_lengths(streams: tuple[Tensor, ...], seq_len: int) -> None:
    short = [len(s) for s in streams if len(s) <= seq_len + 1]
    if short:
        raise ValueError(f"streams of {short} tokens are too short for windows of seq_len + 1 ({seq_len + 1})")


def train_batch(streams: tuple[Tensor, ...], batch: int, seq_len: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows, each from a uniformly drawn domain."""
    _check_lengths(streams, seq_len)
    domain_B = torch.randint(len(streams), (batch,), generator=g)
    start_B = torch.stack([torch.randint(len(streams[int(d)]) - seq_len - 1, (), generator=g) for d in domain_B])
    return _windows(streams, domain_B, start_B, seq_len)


def valid_batches(streams: tuple[Tensor, ...], batch: int, seq_len: int,
                  windows_per_domain: int) -> list[tuple[Tensor, Tensor]]:
    """The same evenly spaced windows for every run: `windows_per_domain` per domain, in batches."""
    _check_lengths(streams, seq_len)
    domains, starts = [], []
    for d, stream in enumerate(streams):
        span = len(stream) - seq_len - 1
        domains += [d] * windows_per_domain
        starts += [span * i // windows_per_domain for i in range(windows_per_domain)]
    domain_N, start_N = torch.tensor(domains), torch.tensor(starts)
    return [_windows(streams, domain_N[i:i + batch], start_N[i:i + batch], seq_len)
            for i in range(0, len(domains), batch)]
