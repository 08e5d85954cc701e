"""Language-model comparison (docs/routing_study.md, "4. MoE language model"): the same MoE
transformer (`moe_dist.model`) trained with each arm of `moe_dist.study.lm_arms` on the multilingual
fortunes (language = label) and optionally tiny-shakespeare, at equal tokens and equal active
expert compute, plus a dense baseline whose FFN has the active width of the MoE (top_k * expert
d_ff, so the same active FFN parameters).

Legend: B sequences, S sequence length, V vocabulary, E experts, L domain labels, M micro batches.

Single process (ep_size 1), a plain AdamW loop with linear warmup and cosine decay, gradient
clipping at 1, the arm's aux losses and each router's `after_step` hook, as the trainer runs them.
Each optimizer step takes `micro_batches` micro batches of batch / M sequences whose losses are
scaled by 1 / M before backward, as DeepSpeed's gradient accumulation does (so the LM loss's
gradient is the full batch's mean; a micro-batch-scoped balance loss sees each micro batch alone),
the global_batch scope's running counts handed from micro batch to micro batch and restarted each
step (`Trainer.train_step`), and `after_step` gets the step's summed load once. A receive budget
(`moe.rank_capacity_factor`) splits the experts over `budget_ranks` stand-in EP ranks
(`MoESideInputs.budget_ranks`): at the layer's own ep_size 1 a rank's budget is all T x K pairs.
Tokens: a SentencePiece BPE model trained in the run for the fortunes (so that tokens carry
language: bytes are mostly shared by de/en/es), bytes for tiny-shakespeare (no labels). Measured: the validation loss on a small fixed set every
`eval_every` steps (the curve); at the end, on the full fixed validation windows in eval mode, the
loss (overall and per language) and per MoE layer I(expert; language) / H(language), load CV and
dropped fraction; the dropped fraction at the training capacity factor (and receive budget) over
the second half of training; route stability: at every curve point each MoE layer's top-k choices
for a fixed probe set of validation tokens, and the fraction of them whose top-1 expert (top-k set)
is unchanged since the previous point (`trace_analysis.route_stability`); the router's own
parameters and forward FLOPs per token; CPU seconds per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from moe_dist.evaluate.trace_analysis import route_stability
from moe_dist.model import MoETransformer, parse_model_config
from moe_dist.study.lm_arms import ARMS, OVERFLOW_PAIR, SCOPE_PAIR, Arm
from moe_dist.study.lm_corpus import Corpus, load_corpus, prepare_corpus, train_batch, valid_batches
from moe_dist.study.seeds import seed_stats
from moe_dist.study.tasks import Task
from moe_dist.train.moe_metrics import MoEStatsAccumulator

# Corpora a budget may leave out, with the reason the page gives.
CORPUS_LEFT_OUT_REASONS = {
    "shakespeare": "a second corpus doubles the part's CPU time, and the study's 60 minutes on 2 cores hold "
                   "one at this model size and seed count; the fortunes are the corpus with domain labels, "
                   "the one I(expert; domain) and inhibition's common-mode claim need",
}
# Arms of `ARMS` a budget may leave out, with the reason the page gives.
LEFT_OUT_REASONS = {
    "attentive": "its gate (attention of the token over expert keys) multiplies the router's FLOPs many times "
                 "and costs the most CPU per step of every arm: with it the LM part would not leave the whole "
                 "study inside its 60 minutes on 2 cores at this model size and seed count (the sizing is in "
                 "the budget's commit and the page's CPU times)",
}
# Why the budget's `reduced_seed_arms` run on fewer seeds, as the page gives it.
REDUCED_SEEDS_REASON = ("each costs at least topk's CPU per step (spill's rounds and the dropless experts more; "
                        "the cost table's CPU s/step): at every seed the three would take the study past its 60 "
                        "minutes on 2 cores; 3 seeds is issue 22's minimum, and their claims pair the runs on the "
                        "seeds both arms ran")


@dataclass(frozen=True)
class LanguageModelBudget:
    corpora: tuple[str, ...] = ("fortunes",)
    sentencepiece_corpora: tuple[str, ...] = ("fortunes",)  # the others use bytes
    sentencepiece_vocab: int = 512
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    d_model: int = 64
    n_layers: int = 4  # every layer MoE
    n_heads: int = 4
    num_experts: int = 16
    top_k: int = 2
    expert_d_ff: int = 64
    seq_len: int = 64
    batch: int = 32  # sequences per optimizer step
    micro_batches: int = 2  # gradient-accumulation micro batches per step (batch / micro_batches each)
    steps: int = 1000
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    valid_windows: int = 384  # the final validation, split evenly over the corpus' domains
    curve_windows: int = 48  # the validation curve's fixed set, evenly spread over each domain's text
    eval_every: int = 50  # steps between points of the validation curve
    probe_windows: int = 6  # route stability's fixed probe set: validation windows, split over the domains
    budget_ranks: int = 4  # stand-in EP ranks a receive budget splits the experts over
    reduced_seed_arms: tuple[str, ...] = ()  # arms that run on the first `reduced_seeds` seeds only
    reduced_seeds: int = 3

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown language-model arm(s) {unknown}; choose from {list(ARMS)}")
        absent = [a for a in self.reduced_seed_arms if a not in self.arms]
        if absent:
            raise ValueError(f"reduced_seed_arms {absent} are not among the budget's arms {list(self.arms)}")
        if self.reduced_seed_arms and not 1 <= self.reduced_seeds <= len(self.seeds):
            raise ValueError(f"reduced_seeds ({self.reduced_seeds}) must be between 1 and the {len(self.seeds)} seeds")
        if self.budget_ranks < 1 or self.num_experts % self.budget_ranks:
            raise ValueError(f"budget_ranks ({self.budget_ranks}) must divide num_experts ({self.num_experts})")
        if self.probe_windows < 1:
            raise ValueError(f"probe_windows ({self.probe_windows}) must be >= 1")
        if self.micro_batches < 1 or self.batch % self.micro_batches:
            raise ValueError(f"batch ({self.batch}) must split into micro_batches ({self.micro_batches}) "
                             f"equal micro batches")
        if self.eval_every < 1 or self.curve_windows < 1:
            raise ValueError(f"eval_every ({self.eval_every}) and curve_windows ({self.curve_windows}) must be >= 1")

    def seeds_of(self, arm: str) -> tuple[int, ...]:
        return self.seeds[:self.reduced_seeds] if arm in self.reduced_seed_arms else self.seeds


FULL = LanguageModelBudget(arms=tuple(a for a in ARMS if a not in LEFT_OUT_REASONS),
                           reduced_seed_arms=(SCOPE_PAIR[0], *OVERFLOW_PAIR))
QUICK = LanguageModelBudget(corpora=("fortunes", "shakespeare"), seeds=(0,), d_model=32, n_layers=2, n_heads=2,
                            num_experts=4, expert_d_ff=16, seq_len=16, batch=4, micro_batches=2, steps=3,
                            warmup_steps=1, valid_windows=12, curve_windows=6, eval_every=2, probe_windows=3,
                            budget_ranks=2, reduced_seed_arms=(SCOPE_PAIR[0], *OVERFLOW_PAIR), reduced_seeds=1)


def model_config(b: LanguageModelBudget, arm: Arm, vocab_size: int, num_labels: int):
    model = dict(vocab_size=vocab_size, d_model=b.d_model, n_layers=b.n_layers, n_heads=b.n_heads,
                 d_ff=b.top_k * b.expert_d_ff, max_seq_len=b.seq_len, num_labels=num_labels)
    if arm.router is None:
        return parse_model_config({**model, "moe_every": 0})
    return parse_model_config(model, dict(arm.moe, d_ff=b.expert_d_ff, num_experts=b.num_experts, top_k=b.top_k,
                                          router=arm.router))


def lr_at(step: int, b: LanguageModelBudget) -> float:
    if step < b.warmup_steps:
        return b.lr * (step + 1) / b.warmup_steps
    progress = (step - b.warmup_steps) / max(1, b.steps - b.warmup_steps)
    return b.min_lr + (b.lr - b.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _layer_summary(summary: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for layer, row in summary.items():
        entry = {"dropped_fraction": row["dropped_fraction"], "load_cv": row["load_cv"]}
        if "pairs_over_budget" in row:  # as fractions of the routed pairs
            pairs = max(sum(row["load_E"]), 1.0)
            entry["over_budget_fraction"] = row["pairs_over_budget"] / pairs
            entry["spilled_fraction"] = row["pairs_spilled"] / pairs
        if "expert_label_counts" in row:
            entry["mi_label_normalized"] = row.get("mi_domain_normalized", 0.0)
            entry["expert_label_counts"] = row["expert_label_counts"]
        out[str(layer)] = entry
    return out


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: Corpus, b: LanguageModelBudget, windows: int) -> dict[str, Any]:
    """Loss (overall, per domain) and routing statistics on `windows` fixed validation windows."""
    model.eval()
    labelled = bool(corpus.domain_names)
    per_domain = max(1, windows // len(corpus.valid))
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


@torch.no_grad()
def router_cost(model: MoETransformer, tokens_BS: Tensor) -> dict[str, float]:
    """The routers' own trainable parameters and fixed tables (buffers: projections, statistics,
    biases, token tables), and their forward FLOPs per token, summed over the MoE layers (counted by
    torch's FlopCounterMode, which counts matrix products: element-wise work such as a hash lookup or
    a centring counts 0). The experts' FLOPs are equal in every arm by construction and not counted
    here: the counter does not see every expert backend's kernels."""
    routers = [moe.router for _, moe in model.moe_layers()]
    params = sum(p.numel() for r in routers for p in r.parameters() if p.requires_grad)
    buffers = sum(b.numel() for r in routers for b in r.buffers()) + \
        sum(p.numel() for r in routers for p in r.parameters() if not p.requires_grad)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens_BS)
    model.train(was_training)
    tokens = tokens_BS.numel()
    router_flops = sum(sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()
                       if name.endswith(".router"))
    return {"router_params": float(params), "router_buffers": float(buffers),
            "router_flops_per_token": router_flops / tokens}


def accumulate_gradients(model: MoETransformer, tokens_BS1: Tensor, domain_BS: Tensor | None, micro_batches: int,
                         budget_ranks: int = 0) -> tuple[float, dict[int, Tensor], list[dict[int, dict[str, Tensor]]]]:
    """Forward and backward of one optimizer step's batch as `micro_batches` equal micro batches, each
    loss scaled by 1 / micro_batches as DeepSpeed's gradient accumulation does, and the global_batch
    scope's running counts handed from each micro batch to the next, from none at the step's first,
    as `Trainer.train_step` does: the step's LM loss (mean over the micro batches), the step's
    pre-drop load per MoE layer (summed, for `after_step`) and each micro batch's routing statistics.
    `budget_ranks`: stand-in EP ranks of a receive budget (0: the layers' ep_size)."""
    micro = tokens_BS1.shape[0] // micro_batches
    step_loss, load, stats = 0.0, {}, []
    step_counts = None
    for m in range(micro_batches):
        rows = slice(m * micro, (m + 1) * micro)
        out = model(tokens_BS1[rows, :-1], tokens_BS1[rows, 1:], None if domain_BS is None else domain_BS[rows],
                    step_counts=step_counts, budget_ranks=budget_ranks)
        step_counts = out.step_counts or None
        (out.loss / micro_batches).backward()
        step_loss += float(out.lm_loss.detach()) / micro_batches
        for layer, row in out.moe_stats.items():
            load[layer] = load[layer] + row["tokens_per_expert"] if layer in load else row["tokens_per_expert"]
        stats.append(out.moe_stats)
    return step_loss, load, stats


def probe_set(corpus: Corpus, b: LanguageModelBudget) -> Tensor:
    """The fixed probe windows of route stability: `probe_windows` validation windows spread over
    each domain's text, [N, seq_len] input tokens."""
    per_domain = max(1, b.probe_windows // len(corpus.valid))
    return torch.cat([tokens_BS1[:, :-1] for tokens_BS1, _ in valid_batches(corpus.valid, b.batch, b.seq_len,
                                                                               per_domain)])


@torch.no_grad()
def probe_routes(model: MoETransformer, probe_NS: Tensor) -> dict[int, np.ndarray]:
    """Per MoE layer, each probe token's top-k experts as the router chose them (before capacity),
    in eval mode: [N * S, K], column 0 the top choice."""
    model.eval()
    out = model(probe_NS, trace=True)
    model.train()
    return {layer: route.idx_TK.numpy() for layer, route in out.routes.items()}


def stability_between(before: dict[int, np.ndarray], after: dict[int, np.ndarray]) -> dict[str, list[float]]:
    """`route_stability` of every MoE layer between two probe snapshots, as lists by layer order."""
    rows = [route_stability(before[layer], after[layer]) for layer in sorted(after)]
    return {k: [r[k] for r in rows] for k in ("top1_unchanged", "topk_set_unchanged")}


def run_one(corpus_path: str, arm: str, seed: int, budget: dict[str, Any]) -> dict[str, Any]:
    b = LanguageModelBudget(**budget)
    corpus = load_corpus(corpus_path)
    labelled = bool(corpus.domain_names)
    model = MoETransformer(model_config(b, ARMS[arm], corpus.vocab_size, len(corpus.domain_names)), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=b.weight_decay, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    late_stats = MoEStatsAccumulator()  # training-time drops, once routing has settled
    cpu_seconds, wall_seconds, last_loss = 0.0, 0.0, float("nan")
    curve: list[dict[str, float]] = []
    stability: list[dict[str, Any]] = []
    probe_NS = probe_set(corpus, b)
    routes, routes_step = {}, 0
    cost: dict[str, float] = {}
    micro = b.batch // b.micro_batches

    def curve_point(step: int) -> None:
        nonlocal routes, routes_step
        curve.append({"step": step, "val_loss": evaluate(model, corpus, b, b.curve_windows)["val_loss"]})
        now = probe_routes(model, probe_NS)
        if routes and now:
            stability.append({"from_step": routes_step, "to_step": step, **stability_between(routes, now)})
        routes, routes_step = now, step

    for step in range(b.steps):
        # The step's whole batch is drawn at once: the data a seed sees is the same for any micro_batches.
        tokens_BS1, domain_BS = train_batch(corpus.train, b.batch, b.seq_len, g)
        if not cost:
            cost = router_cost(model, tokens_BS1[:micro, :-1])
        if step % b.eval_every == 0:
            curve_point(step)
        start, cpu_start = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, b)
        opt.zero_grad(set_to_none=True)
        step_loss, load, micro_stats = accumulate_gradients(model, tokens_BS1, domain_BS if labelled else None,
                                                            b.micro_batches, b.budget_ranks)
        if step >= b.steps // 2:
            for stats in micro_stats:
                late_stats.add(stats)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for layer, moe in model.moe_layers():
            moe.router.after_step(load[layer])
        wall_seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        last_loss = step_loss
    result = evaluate(model, corpus, b, b.valid_windows)
    curve_point(b.steps)
    for layer, row in _layer_summary(late_stats.summary()).items():
        result["layers"][layer]["train_dropped_fraction"] = row["dropped_fraction"]
        for name in ("over_budget_fraction", "spilled_fraction"):
            if name in row:
                result["layers"][layer][f"train_{name}"] = row[name]
    return {"corpus": corpus.name, "tokenizer": corpus.tokenizer, "arm": arm, "seed": seed, "train_loss": last_loss,
            "tokens_per_s": b.steps * b.batch * b.seq_len / wall_seconds,
            "cpu_seconds_per_step": cpu_seconds / b.steps, "curve": curve, "route_stability": stability,
            **cost, **result}


def prepare_corpora(budget: LanguageModelBudget, data_dir: str, work_dir: str) -> dict[str, str]:
    """Tokenize each corpus once, before the runs: {corpus: token file}."""
    return {c: prepare_corpus(c, data_dir, work_dir,
                              budget.sentencepiece_vocab if c in budget.sentencepiece_corpora else None)
            for c in budget.corpora}


def tasks(budget: LanguageModelBudget, corpus_paths: dict[str, str]) -> list[Task]:
    # ~seconds on one busy core, as the other parts' costs (queue order, ETA): tokens times the
    # per-token work that grows with the model.
    cost = budget.steps * budget.batch * budget.seq_len * budget.n_layers * budget.d_model / 4e6
    return [Task("language_model", f"{corpus} {arm} seed={seed}", run_one,
                 dict(corpus_path=corpus_paths[corpus], arm=arm, seed=seed, budget=asdict(budget)), cost)
            for corpus in budget.corpora for arm in budget.arms for seed in budget.seeds_of(arm)]


SEED_METRICS = ("val_loss", "tokens_per_s", "cpu_seconds_per_step", "router_params", "router_buffers",
                "router_flops_per_token")


def _layer_metric(record: dict[str, Any], metric: str) -> list[float]:
    return [row[metric] for _, row in sorted(record["layers"].items(), key=lambda kv: int(kv[0])) if metric in row]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """{corpus: {arm: {"val_loss", "tokens_per_s", "cpu_seconds_per_step", the router's cost, the
    validation curve ({"steps", "val_loss": stats per step}), route stability ({"steps", "top1_unchanged",
    "topk_set_unchanged": stats per step of the layer means}, MoE arms), per-layer lists of stats, seed 0's
    label table}}}."""
    table: dict[str, Any] = {}
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        table[corpus] = {}
        for arm in dict.fromkeys(r["arm"] for r in records):
            rows = [r for r in records if (r["corpus"], r["arm"]) == (corpus, arm)]
            if not rows:
                continue
            entry: dict[str, Any] = {m: seed_stats([r[m] for r in rows]) for m in SEED_METRICS}
            steps = [p["step"] for p in rows[0]["curve"]]
            entry["curve"] = {"steps": steps, "val_loss": [seed_stats([r["curve"][i]["val_loss"] for r in rows])
                                                           for i in range(len(steps))]}
            entry["val_loss_by_domain"] = {d: seed_stats([r["val_loss_by_domain"][d] for r in rows])
                                           for d in rows[0]["val_loss_by_domain"]}
            if rows[0]["route_stability"]:
                # Layer-averaged per seed, then over seeds, at each curve point after the first.
                entry["route_stability"] = {
                    "steps": [p["to_step"] for p in rows[0]["route_stability"]],
                    **{k: [seed_stats([sum(r["route_stability"][i][k]) / len(r["route_stability"][i][k])
                                       for r in rows]) for i in range(len(rows[0]["route_stability"]))]
                       for k in ("top1_unchanged", "topk_set_unchanged")}}
            for metric in ("mi_label_normalized", "dropped_fraction", "train_dropped_fraction", "load_cv",
                           "train_over_budget_fraction", "train_spilled_fraction"):
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
