"""`hash`: routing by a fixed token-id -> experts table (docs/routers/hash.md; Roller et al., "Hash
Layers For Large Sparse Models", NeurIPS 2021; DeepSeek-V4's hash layers).

Legend: moe_dist/moe/__init__.py (V: the vocabulary; the table is [V, K]).

Token id v goes to the K experts of row v of `table_VK`, each weighted 1/K (1 at K=1, as the
papers): routes depend on the token id alone, not on its context, and nothing is learned. The
table is a persistent int64 buffer, so a checkpoint, a resumed run and an export carry exactly the
table the run trained with, whichever way it was built:

- `seeded` (the default): every expert gets V*K/E of the ids (V*K/E rounded up or down when E does
  not divide V*K), drawn from a CPU generator seeded by (router.seed, layer index): needs nothing
  but the config, so every rank and every EP size builds the same table;
- `frequency`: greedy bin packing of the training data's token counts (a `.npy` of int64 [V],
  `tools/preprocess_data.py --token-counts`), so that each expert's expected load is equal
  within one token's count.

No distribution over experts exists, so `probs_TE` is None: no aux loss applies (as
`fixed_projection` with uniform weights), and the weights carry no gradient.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moe_dist.common.config import ConfigError, check, check_choice
from moe_dist.common.seeding import init_generator
from moe_dist.routing.base import Router, RouterConfig, RouterOutput, RoutingContext
from moe_dist.routing.replay import forced_or

TABLES = ("seeded", "frequency")
# init_generator key of the seeded table, apart from the layer's other keys (moe/layer.py, comet.py).
HASH_TABLE_KEY = -105


@dataclass
class HashRouterConfig(RouterConfig):
    type: str = "hash"
    table: str = "seeded"  # seeded | frequency (docs/routers/hash.md says why seeded is the default)
    seed: int = 0  # table=seeded: with the layer index, seeds the table
    # table=frequency: a .npy of int64 [vocab_size] token counts of the training data.
    token_counts: str | None = None
    # The table's rows: model.vocab_size, filled in from it when the model config is parsed.
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        check_choice("router.table", self.table, TABLES)
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
              f"router.seed must be an integer, got {self.seed!r}")
        check(self.vocab_size is None or (isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool)
                                          and self.vocab_size >= 1),
              f"router.vocab_size must be an integer >= 1 (model.vocab_size) or null, got {self.vocab_size!r}")
        if self.table == "frequency":
            check(isinstance(self.token_counts, str) and self.token_counts != "",
                  f"router.table frequency needs router.token_counts, the path of a .npy of the training data's "
                  f"token counts (tools/preprocess_data.py --token-counts), got {self.token_counts!r}")
        else:
            check(self.token_counts is None,
                  f"router.token_counts ({self.token_counts!r}) is read only with router.table frequency, "
                  f"but router.table is {self.table!r}")


def seeded_table(vocab_size: int, num_experts: int, top_k: int, generator: torch.Generator) -> Tensor:
    """[V, K] int64: rows of K distinct experts, each expert in floor or ceil(V*K/E) rows.

    The V*K entries, row after row, are a sequence of random permutations of the E experts: each
    permutation gives every expert once, which is the balance. A row that straddles two
    permutations could repeat an expert; the second permutation's head is then reordered (a swap
    with a later entry), which keeps it a permutation."""
    total = vocab_size * top_k
    flat: list[int] = []
    while len(flat) < total:
        perm = torch.randperm(num_experts, generator=generator, device="cpu").tolist()
        open_row = len(flat) % top_k  # entries of the row in progress already placed
        if open_row:
            taken = set(flat[-open_row:])
            for i in range(top_k - open_row):
                if perm[i] in taken:
                    j = next(j for j in range(top_k - open_row, num_experts) if perm[j] not in taken)
                    perm[i], perm[j] = perm[j], perm[i]
        flat.extend(perm)
    return torch.tensor(flat[:total], dtype=torch.int64, device="cpu").view(vocab_size, top_k)


def frequency_table(counts_V: np.ndarray, num_experts: int, top_k: int) -> Tensor:
    """[V, K] int64 by greedy bin packing (longest processing time first): ids in order of falling
    count (ties by id) each go to the K experts of least expected load so far (ties: fewer ids,
    then lower expert id). Then max - min expected load <= the largest count: adding a count c to
    the K lightest experts never opens a gap wider than c.

    Ids never seen (count 0) add no expected load; they are dealt out evenly over the experts, so
    unseen ids at inference do not all land on the same K experts."""
    counts = np.asarray(counts_V, dtype=np.int64)
    table = np.empty((len(counts), top_k), dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    seen = order[counts[order] > 0]
    heap = [(0, 0, e) for e in range(num_experts)]  # (expected load, ids, expert)
    for v in seen.tolist():
        chosen = [heapq.heappop(heap) for _ in range(top_k)]
        c = int(counts[v])
        table[v] = [e for _, _, e in chosen]
        for load, ids, e in chosen:
            heapq.heappush(heap, (load + c, ids + 1, e))
    unseen = [(0, e) for e in range(num_experts)]  # (unseen ids, expert)
    for v in order[len(seen):].tolist():
        chosen = [heapq.heappop(unseen) for _ in range(top_k)]
        table[v] = [e for _, e in chosen]
        for ids, e in chosen:
            heapq.heappush(unseen, (ids + 1, e))
    return torch.from_numpy(table)  # CPU, whatever the default device


def expected_load(table_VK: Tensor, counts_V: Tensor | np.ndarray, num_experts: int) -> Tensor:
    """[E] int64: the routed pairs each expert receives when every id v occurs counts_V[v] times."""
    counts = torch.as_tensor(np.asarray(counts_V, dtype=np.int64))
    K = table_VK.shape[1]
    return torch.zeros(num_experts, dtype=torch.int64).index_add_(
        0, table_VK.reshape(-1), counts.repeat_interleave(K))


def read_token_counts(path: str, vocab_size: int) -> np.ndarray:
    """The int64 [vocab_size] counts in the .npy at `path`; ConfigError naming what is wrong."""
    where = f"router.token_counts {path!r}"
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read it as a .npy array ({e}); write it with "
                          f"tools/preprocess_data.py --token-counts") from None
    if counts.ndim != 1 or len(counts) != vocab_size:
        raise ConfigError(f"{where} holds an array of shape {list(counts.shape)}, expected [{vocab_size}] "
                          f"(one count per token id of model.vocab_size)")
    if counts.dtype.kind not in "iu":
        raise ConfigError(f"{where} holds {counts.dtype} values, expected integer token counts")
    if len(counts) and counts.min() < 0:
        raise ConfigError(f"{where} holds a negative count ({int(counts.min())} at token id "
                          f"{int(counts.argmin())}), expected counts >= 0")
    return counts.astype(np.int64)


class HashRouter(Router):
    def __init__(self, cfg: HashRouterConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        if cfg.vocab_size is None:
            raise ConfigError("the hash router needs router.vocab_size: the model's parser fills it in from "
                              "model.vocab_size; a layer built on its own must set it")
        V, E, K = cfg.vocab_size, self.num_experts, self.top_k
        # Why the table cannot route yet (None: it can). A frequency table whose counts file is not
        # here may still come from a checkpoint (evaluation, export, resume on another machine).
        self.missing_table: str | None = None
        if cfg.table == "seeded":
            table_VK = seeded_table(V, E, K, init_generator(cfg.seed, self.layer_index, HASH_TABLE_KEY))
        elif os.path.exists(cfg.token_counts):
            table_VK = frequency_table(read_token_counts(cfg.token_counts, V), E, K)
        else:
            table_VK = torch.full((V, K), -1, dtype=torch.int64, device="cpu")
            self.missing_table = (f"hash router of layer {self.layer_index}: router.table frequency builds its "
                                  f"table from router.token_counts {cfg.token_counts!r}, which does not exist, and "
                                  f"no checkpoint was loaded into it; write the counts with "
                                  f"tools/preprocess_data.py --token-counts or load a checkpoint")
        # Built on the CPU (a generator's draws and a Python packing), then placed where the model is
        # being built (a `torch.device` context: the meta device of memory estimates).
        self.register_buffer("table_VK", table_VK.to(torch.get_default_device()), persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "table_VK" in state_dict:
            self.missing_table = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x_TD: Tensor, ctx: RoutingContext) -> RouterOutput:
        if self.missing_table is not None:
            raise ValueError(self.missing_table)
        token_ids_T = ctx.token_ids_T
        if token_ids_T is None:
            raise ValueError("the hash router routes by token id: pass MoELayer.forward a "
                             "MoESideInputs(token_ids_T=...) holding each token's input id (MoETransformer does)")
        if token_ids_T.numel() != x_TD.shape[0]:
            raise ValueError(f"the hash router got {token_ids_T.numel()} token ids for {x_TD.shape[0]} tokens")
        # Replay takes the recorded ids; the weights stay uniform, as the hash router's always are.
        idx_TK = forced_or(self.table_VK[token_ids_T.reshape(-1)], ctx.forced)
        w_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, dtype=torch.float32, device=x_TD.device)
        return RouterOutput(idx_TK=idx_TK, w_TK=w_TK)
