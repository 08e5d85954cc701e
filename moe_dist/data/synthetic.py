"""A built-in multi-domain corpus for the quickstart and tests: no download, no files.

Each domain is a first-order Markov chain over the printable ASCII bytes (so a sample decodes
to readable text with the byte tokenizer): from every symbol it moves to one of `branching`
domain-specific successors with probabilities 1/2, 1/4, ... (the last two equal). The domains
share the alphabet and differ only in their transitions, so a model predicts well only after
inferring the domain from context, which is what expert routing can specialise on.

Sample i is a pure function of (seed, stream, i): any sample can be produced in any order, by
any rank, after any restart. Every sample starts at a document boundary and packs documents of
random domain and length, each followed by eod, into seq_length + 1 tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_dist.data.config import ALPHABET_FIRST, ALPHABET_SIZE, SyntheticDataConfig

ALPHABET = np.arange(ALPHABET_FIRST, ALPHABET_FIRST + ALPHABET_SIZE, dtype=np.int64)
TRAIN_STREAM, VALID_STREAM = 0, 1


def successor_probs(branching: int) -> np.ndarray:
    """[branching] probabilities 1/2, 1/4, ..., with the last two equal so they sum to 1."""
    probs = 0.5 ** np.arange(1, branching + 1)
    probs[-1] *= 2
    return probs


class SyntheticCorpus(torch.utils.data.Dataset):
    """Samples {"tokens": int64 [S+1], "domain_ids": int64 [S]}, as the Megatron datasets give."""

    def __init__(self, cfg: SyntheticDataConfig, seq_length: int, num_samples: int, seed: int,
                 eod: int, stream: int = TRAIN_STREAM) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if eod in ALPHABET:
            raise ValueError(f"eod ({eod}) must lie outside the alphabet "
                             f"[{ALPHABET[0]}, {ALPHABET[-1]}]")
        self.cfg = cfg
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.eod = eod
        self.stream = stream
        # The chains depend on the seed only, so train and valid streams share the domains.
        rng = np.random.default_rng([seed, 1 << 20])
        shape = (cfg.num_domains, ALPHABET_SIZE, ALPHABET_SIZE)
        # successors[domain, symbol, j]: the symbol that follows `symbol` on choice j of the chain.
        self.successors = np.argsort(rng.random(shape), axis=-1)[..., : cfg.branching]
        self.cum_probs = np.cumsum(successor_probs(cfg.branching))  # [branching]
        self.domain_names = [f"domain{d}" for d in range(cfg.num_domains)]

    def __len__(self) -> int:
        return self.num_samples

    def _document(self, rng: np.random.Generator, domain: int, length: int) -> np.ndarray:
        """`length` symbols of domain `domain`'s chain, as byte ids."""
        choices = np.searchsorted(self.cum_probs, rng.random(length), side="right")
        choices = np.minimum(choices, self.cfg.branching - 1)  # guards float round-off at 1.0
        chain = self.successors[domain].tolist()
        state = int(rng.integers(ALPHABET_SIZE))
        states = [state]
        for j in choices[1:].tolist():
            state = chain[state][j]
            states.append(state)
        return ALPHABET[states]

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, self.stream, idx])
        total = self.seq_length + 1
        tokens = np.empty(total, dtype=np.int64)
        domains = np.empty(total, dtype=np.int64)
        pos = 0
        while pos < total:
            domain = int(rng.integers(self.cfg.num_domains))
            length = int(rng.integers(self.cfg.min_doc_tokens, self.cfg.max_doc_tokens + 1))
            # Only the part that fits is generated: the sample ends mid-document.
            length = min(length, total - pos)
            doc = np.append(self._document(rng, domain, length), self.eod)[: total - pos]
            tokens[pos : pos + len(doc)] = doc
            domains[pos : pos + len(doc)] = domain
            pos += len(doc)
        return {"tokens": tokens, "domain_ids": domains[:-1]}
