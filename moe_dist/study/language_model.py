"""Language-model comparison (docs/routing_study.md, "4. Small MoE language model"): the same small
MoE transformer (`moe_dist.model`) trained with each router on the multilingual fortunes (language =
label) and on tiny-shakespeare, at equal tokens and equal active compute, plus a dense baseline
whose FFN has the active width of the MoE (top_k * expert d_ff, so the same active FFN parameters).

Legend: B sequences, S sequence length, V vocabulary, E experts, L domain labels.

Single process (ep_size 1), a plain AdamW loop with linear warmup and cosine decay, gradient
clipping at 1, the layer's default aux losses and each router's `after_step` hook, as the
trainer runs them. Tokens: a SentencePiece BPE model trained in the run for the fortunes (so
that tokens carry language: bytes are mostly shared by de/en/es), bytes for tiny-shakespeare
(the classic character-level setting; it has no labels). Measured on fixed validation windows in eval
mode: loss (overall and per language), and per MoE layer I(expert; language) / H(language), load
CV and dropped fraction (eval capacity factor); the dropped fraction at the training capacity
factor over the second half of training; training tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moe_dist.model import MoETransformer, parse_model_config
from moe_dist.study.lm_corpus import Corpus, load_corpus, prepare_corpus, train_batch, valid_batches
from moe_dist.study.seeds import seed_stats
from moe_dist.study.tasks import Task
from moe_dist.train.moe_metrics import MoEStatsAccumulator

# Routers at their shipped defaults; None: the dense baseline.
ARMS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "topk": {"type": "topk"},
    "inhibition": {"type": "inhibition"},
    "fixed_projection": {"type": "fixed_projection"},
    "fixed_projection center": {"type": "fixed_projection", "center": True},
    "attentive": {"type": "attentive"},
    # The non-learned baseline beside COMET's fixed projection: a seeded token-id table.
    "hash": {"type": "hash"},
}


@dataclass(frozen=True)
class LanguageModelBudget:
    corpora: tuple[str, ...] = ("fortunes", "shakespeare")
    sentencepiece_corpora: tuple[str, ...] = ("fortunes",)  # the others use bytes
    sentencepiece_vocab: int = 512
    seeds: tuple[int, ...] = (0, 1, 2)
    d_model: int = 64
    n_layers: int = 2  # every layer MoE
    n_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_d_ff: int = 64
    seq_len: int = 64
    batch: int = 32
    steps: int = 400
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    valid_windows: int = 192  # split evenly over the corpus' domains


FULL = LanguageModelBudget()
QUICK = LanguageModelBudget(seeds=(0,), d_model=32, n_heads=2, num_experts=4, expert_d_ff=16, seq_len=16,
                            batch=4, steps=2, warmup_steps=1, valid_windows=12)


def model_config(b: LanguageModelBudget, router: dict[str, Any] | None, vocab_size: int, num_labels: int):
    model = dict(vocab_size=vocab_size, d_model=b.d_model, n_layers=b.n_layers, n_heads=b.n_heads,
                 d_ff=b.top_k * b.expert_d_ff, max_seq_len=b.seq_len, num_labels=num_labels)
    if router is None:
        return parse_model_config({**model, "moe_every": 0})
    return parse_model_config(model, dict(d_ff=b.expert_d_ff, num_experts=b.num_experts, top_k=b.top_k, router=router))


def lr_at(step: int, b: LanguageModelBudget) -> float:
    if step < b.warmup_steps:
        return b.lr * (step + 1) / b.warmup_steps
    progress = (step - b.warmup_steps) / max(1, b.steps - b.warmup_steps)
    return b.min_lr + (b.lr - b.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _layer_summary(summary: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for layer, row in summary.items():
        entry = {"dropped_fraction": row["dropped_fraction"], "load_cv": row["load_cv"]}
        if "expert_label_counts" in row:
            entry["mi_label_normalized"] = row.get("mi_domain_normalized", 0.0)
            entry["expert_label_counts"] = row["expert_label_counts"]
        out[str(layer)] = entry
    return out


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: Corpus, b: LanguageModelBudget) -> dict[str, Any]:
    model.eval()
    labelled = bool(corpus.domain_names)
    per_domain = max(1, b.valid_windows // len(corpus.valid))
    stats = MoEStatsAccumulator()
    loss_sum = torch.zeros(len(corpus.valid))
    count = torch.zeros(len(corpus.valid))
    for tokens_BS1, domain_BS in valid_batches(corpus.valid, b.batch, b.seq_len, per_domain):
        out = model(tokens_BS1[:, :-1], domain_ids_BS=domain_BS if labelled else None)
        nll_BS = F.cross_entropy(out.logits_BSV.float().transpose(1, 2), tokens_BS1[:, 1:], reduction="none")
        loss_sum.index_add_(0, domain_BS.reshape(-1), nll_BS.reshape(-1))
        count.index_add_(0, domain_BS.reshape(-1), torch.ones(nll_BS.numel()))
        stats.add(out.moe_stats)
    model.train()
    names = corpus.domain_names or (corpus.name,)
    return {"val_loss": float(loss_sum.sum() / count.sum()),
            "val_loss_by_domain": {n: float(s / c) for n, s, c in zip(names, loss_sum, count)},
            "layers": _layer_summary(stats.summary())}


def run_one(corpus_path: str, arm: str, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    b = LanguageModelBudget(**budget)
    corpus = load_corpus(corpus_path)
    labelled = bool(corpus.domain_names)
    model = MoETransformer(model_config(b, ARMS[arm], corpus.vocab_size, len(corpus.domain_names)), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=b.weight_decay, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    late_stats = MoEStatsAccumulator()  # training-time drops, once routing has settled
    train_seconds, last_loss = 0.0, float("nan")
    for step in range(b.steps):
        tokens_BS1, domain_BS = train_batch(corpus.train, b.batch, b.seq_len, g)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, b)
        out = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:], domain_BS if labelled else None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for layer, moe in model.moe_layers():
            moe.router.after_step(out.moe_stats[layer]["tokens_per_expert"])
        train_seconds += time.perf_counter() - start
        if step >= b.steps // 2:
            late_stats.add(out.moe_stats)
        last_loss = float(out.lm_loss.detach())
    result = evaluate(model, corpus, b)
    for layer, row in _layer_summary(late_stats.summary()).items():
        result["layers"][layer]["train_dropped_fraction"] = row["dropped_fraction"]
    return {"corpus": corpus.name, "tokenizer": corpus.tokenizer, "arm": arm, "seed": seed, "train_loss": last_loss,
            "tokens_per_s": b.steps * b.batch * b.seq_len / train_seconds, **result}


def prepare_corpora(budget: LanguageModelBudget, data_dir: str, work_dir: str) -> dict[str, str]:
    """Tokenize each corpus once, before the runs: {corpus: token file}."""
    return {c: prepare_corpus(c, data_dir, work_dir,
                              budget.sentencepiece_vocab if c in budget.sentencepiece_corpora else None)
            for c in budget.corpora}


def tasks(budget: LanguageModelBudget, corpus_paths: dict[str, str]) -> list[Task]:
    cost = budget.steps * budget.batch * budget.seq_len / 20_000  # ~seconds on one busy core
    return [Task("language_model", f"{corpus} {arm} seed={seed}", run_one,
                 dict(corpus_path=corpus_paths[corpus], arm=arm, seed=seed, budget=asdict(budget)), cost)
            for corpus in budget.corpora for arm in ARMS for seed in budget.seeds]


def _layer_metric(record: dict[str, Any], metric: str) -> list[float]:
    return [row[metric] for _, row in sorted(record["layers"].items(), key=lambda kv: int(kv[0])) if metric in row]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{corpus: {arm: {"val_loss", "tokens_per_s", per-layer lists of stats, mean label table}}}."""
    table: dict[str, Any] = {}
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        table[corpus] = {}
        for arm in ARMS:
            rows = [r for r in records if (r["corpus"], r["arm"]) == (corpus, arm)]
            if not rows:
                continue
            entry: dict[str, Any] = {m: seed_stats([r[m] for r in rows]) for m in ("val_loss", "tokens_per_s")}
            entry["val_loss_by_domain"] = {d: seed_stats([r["val_loss_by_domain"][d] for r in rows])
                                           for d in rows[0]["val_loss_by_domain"]}
            for metric in ("mi_label_normalized", "dropped_fraction", "train_dropped_fraction", "load_cv"):
                per_seed = [_layer_metric(r, metric) for r in rows]
                if per_seed[0]:
                    entry[metric] = [seed_stats(list(v)) for v in zip(*per_seed)]
            if rows[0]["layers"] and "expert_label_counts" in next(iter(rows[0]["layers"].values())):
                # Seed 0's expert-by-language table per layer, for the heatmaps: expert ids are
                # arbitrary per seed, so tables of different seeds cannot be summed.
                entry["expert_label_counts_seed0"] = [row["expert_label_counts"] for _, row in
                                                      sorted(rows[0]["layers"].items(), key=lambda kv: int(kv[0]))]
            table[corpus][arm] = entry
    return table
