"""Text generation from an `MoETransformer`: a KV cache, batches of prompts of different lengths,
greedy or sampled decoding. Inference only; the training forward is untouched (this module calls
the same modules' `project`/`attend` pieces and the MoE layers as they are).

A batch is left-padded: prompt b's real tokens sit at the end of its row, the attention mask
hides the padding keys, and each token's rotary position counts only the real tokens before it,
so a prompt computes what it computes alone. Positions are computed per token, with no table of
max_seq_len entries, so generation may run past the training length as RoPE models do.

Per step only the new token of each sequence runs through the model; keys and values of earlier
positions come from the cache (`KVCache`, preallocated for the whole generation), so a step
costs the MoE/FFN work of one token plus attention over the positions so far. `use_cache=False`
recomputes every position at every step (the reference the cache is tested against).

Every token's computation must not depend on its batch: the MoE layers must be dropless at eval
(`moe.eval_capacity_factor <= 0` or `dropless`; moe_dist.evaluate.loading gives such models),
else a capacity computed over the batch would drop differently for each batch composition.

Legend: moe_dist/moe/__init__.py (W: key positions, past + new).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.common.config import ConfigError
from moe_dist.model.rotary import rotary_at
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.layer import MoESideInputs


class KVCache:
    """Keys and values of every layer, [B, Y, W_max, A] each, filled up to `length`. With latent
    attention (`model.attention: mla`) the two are the compressed latent [B, 1, W_max, c] and the
    shared rotary key [B, 1, W_max, r] (each attention's `cache_widths`), never full keys and values."""

    def __init__(self, model: MoETransformer, batch: int, max_positions: int, device, dtype) -> None:
        self.k, self.v = [], []
        for block in model.blocks:
            (k_heads, k_width), (v_heads, v_width) = block.attn.cache_widths
            self.k.append(torch.empty((batch, k_heads, max_positions, k_width), device=device, dtype=dtype))
            self.v.append(torch.empty((batch, v_heads, max_positions, v_width), device=device, dtype=dtype))
        self.length = 0

    def append(self, layer: int, k_BYSA: Tensor, v_BYSA: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys and values for `layer`; all of them so far ([B, Y, W, A])."""
        start, S = self.length, k_BYSA.shape[2]
        self.k[layer][:, :, start:start + S] = k_BYSA
        self.v[layer][:, :, start:start + S] = v_BYSA
        return self.k[layer][:, :, :start + S], self.v[layer][:, :, :start + S]


def check_batch_independent(model: MoETransformer) -> None:
    moe = model.cfg.moe
    if moe is not None and not moe.dropless and moe.eval_capacity_factor > 0:
        raise ConfigError(f"generation needs MoE layers that drop nothing at eval (moe.eval_capacity_factor is "
                          f"{moe.eval_capacity_factor}); set it to 0 (moe_dist.evaluate.loading does by default)")


def attention_mask(mask_BW: Tensor, past: int, S: int) -> Tensor:
    """Boolean [B, 1, S, W]: causal over past + new positions, padding keys hidden; a query always
    sees itself, so a padding row is never empty (its output is unused)."""
    W = past + S
    q_S1 = past + torch.arange(S, device=mask_BW.device)[:, None]
    k_1W = torch.arange(W, device=mask_BW.device)[None]
    allowed_BSW = ((k_1W <= q_S1)[None] & mask_BW[:, None, :W]) | (k_1W == q_S1)[None]
    return allowed_BSW[:, None]


@torch.no_grad()
def forward_positions(model: MoETransformer, tokens_BS: Tensor, positions_BS: Tensor, mask_BW: Tensor,
                      cache: KVCache | None) -> Tensor:
    """Logits [B, S, V] of new tokens at `positions_BS`, attending to the cache (if any) and to
    each other; `mask_BW` marks real (True) and padding key positions, past and new."""
    cfg = model.cfg
    B, S = tokens_BS.shape
    past = cache.length if cache is not None else 0
    cos, sin = rotary_at(positions_BS, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    bias = attention_mask(mask_BW, past, S)
    x_BSD = model.embed(tokens_BS)
    side = MoESideInputs(stream_TD=x_BSD.detach().reshape(B * S, -1), token_ids_T=tokens_BS.reshape(-1))
    for i, block in enumerate(model.blocks[:cfg.n_layers]):  # not the MTP block (training only)
        q, k, v = block.attn.project(block.attn_norm(x_BSD), cos, sin)
        if cache is not None:
            k, v = cache.append(i, k, v)
        x_BSD = x_BSD + block.attn.attend(q, k, v, bias)
        if block.moe is None:
            x_BSD = x_BSD + block.ffn(block.ffn_norm(x_BSD))
        else:
            out = block.moe(block.ffn_norm(x_BSD), side)
            x_BSD = x_BSD + out.y
            side = side.handed_on(out.stream)
    if cache is not None:
        cache.length += S
    weight_VD = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return model.norm(x_BSD) @ weight_VD.t()


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    eos_id: int | None = None  # stop a sequence at this token (end-of-document)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling needs max_new_tokens >= 0, temperature >= 0, top_k >= 0 and top_p in "
                              f"(0, 1]; got {self.max_new_tokens}, {self.temperature}, {self.top_k}, {self.top_p}")


def next_tokens(logits_BV: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Greedy (temperature 0) or a draw from the temperature-scaled, top-k / top-p filtered
    distribution."""
    logits_BV = logits_BV.float()
    if cfg.temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits_BV, min(cfg.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_BV, order_BV = torch.sort(logits_BV, descending=True, dim=-1)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= cfg.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def generate(model: MoETransformer, prompts: list[list[int]], cfg: SamplingConfig, *, pad_id: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (without the prompt; ending before `eos_id` where reached)."""
    check_batch_independent(model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = model.embed.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    total = L + cfg.max_new_tokens
    tokens_BW = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    mask_BW = torch.zeros((B, total), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens_BW[b, L - len(p):L] = torch.tensor(p, dtype=torch.long)
        mask_BW[b, L - len(p):] = True  # generated positions are real for every sequence
    positions_BW = (mask_BW.long().cumsum(-1) - 1).clamp_min(0)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 else None
    cache = KVCache(model, B, total, device, model.embed.weight.dtype) if use_cache else None
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    while steps < cfg.max_new_tokens and not bool(done_B.all()):
        end = L + steps
        start = cache.length if cache is not None else 0
        logits = forward_positions(model, tokens_BW[:, start:end], positions_BW[:, start:end], mask_BW[:, :end],
                                   cache)
        new_B = next_tokens(logits[:, -1], cfg, generator)
        tokens_BW[:, end] = torch.where(done_B, torch.full_like(new_B, pad_id), new_B)
        if cfg.eos_id is not None:
            done_B |= new_B == cfg.eos_id
        steps += 1
    out = []
    for b in range(B):
        new = tokens_BW[b, L:L + steps].tolist()
        if cfg.eos_id is not None and cfg.eos_id in new:
            new = new[:new.index(cfg.eos_id)]
        out.append(new)
    return out
