"""Routers of the exported moe_dist model in their eval form, as moe_dist's `routing/` computes
them: scores in fp32 whatever the model's dtype (routing decisions are discontinuous).

- `topk`: softmax or sigmoid scores (`score`), optional selection bias (it moves which experts
  are chosen, never their weights), weights the chosen scores or, with `score_after_topk`, the
  softmax over the K chosen logits; optional renormalization; times `scale`;
- `inhibition`: `topk` (every option above) on the input minus what the population shares, from
  the EMA statistics with bias correction;
- `fixed_projection`: a frozen projection, optional centering and COMET routing stream;
- `attentive`: gate trunk, query, per-expert key probes; softmax top-k.
- `hash`: the token-id -> experts table (`table_VK`, from the checkpoint), weights 1/K; it alone
  reads the token ids (`reads_token_ids`).

Self-contained (torch only); copied into the export with modeling_moe_dist.py.

Legend (moe_dist's letters): T tokens, D model width, E experts, K experts per token, J gate
width (`hidden`), Z shared directions (`rank`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def topk_from_logits(logits_TE, top_k, renormalize, selection_bias_E=None, score="softmax",
                     score_after_topk=False, scale=1.0):
    if score == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    elif score == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        raise ValueError(f"router score {score!r} is not one of 'softmax', 'sigmoid'")
    select_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E
    idx_TK = torch.topk(select_TE, top_k, dim=-1).indices
    if score_after_topk:
        w_TK = torch.softmax(logits_TE.gather(1, idx_TK), dim=-1)
    else:
        w_TK = scores_TE.gather(1, idx_TK)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return idx_TK, (w_TK if scale == 1.0 else w_TK * scale)


class PopulationStatistics(nn.Module):
    """The inhibition statistics' EMA buffers and their bias-corrected values (eval form)."""

    def __init__(self, width, mode, momentum, rank):
        super().__init__()
        self.mode, self.momentum = mode, momentum
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if mode == "subspace":
            self.register_buffer("ema_second_DD", torch.zeros(width, width))
            self.register_buffer("basis_DZ", torch.zeros(width, rank))
        else:
            self.register_buffer("ema_mean_D", torch.zeros(width))
            if mode == "divisive":
                self.register_buffer("ema_var_D", torch.zeros(width))

    def _corrected(self, name, default):
        t = self.num_updates
        value = getattr(self, f"ema_{name}") / (1.0 - self.momentum ** t.float()).clamp_min(1e-12)
        return torch.where(t > 0, value, torch.full_like(value, default))

    def inhibit(self, x_TD, alpha, eps):
        x = x_TD.float()
        if self.mode == "subspace":
            return x - (x @ self.basis_DZ) @ self.basis_DZ.t()
        mean_D = self._corrected("mean_D", 0.0)
        if self.mode == "subtractive":
            return x - alpha * mean_D
        if self.mode == "rectified":
            return F.relu(x - alpha * mean_D)
        return (x - mean_D) * torch.rsqrt(self._corrected("var_D", 1.0) + eps)


class LinearGate(nn.Module):
    def __init__(self, d_model, num_experts):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TD):
        return F.linear(x_TD.float(), self.weight_ED.float())


class TopKRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k = r, top_k
        self.gate = LinearGate(d_model, num_experts)
        self.register_buffer("selection_bias_E", torch.zeros(num_experts))

    def route(self, x_TD):
        bias = self.selection_bias_E if self.r.get("bias_balancing", False) else None
        return topk_from_logits(self.gate(x_TD), self.top_k, self.r.get("renormalize", False), bias,
                                self.r.get("score", "softmax"), self.r.get("score_after_topk", False),
                                self.r.get("scale", 1.0))

    def forward(self, x_TD, stream_TD):
        idx_TK, w_TK = self.route(x_TD)
        return idx_TK, w_TK, stream_TD


class InhibitionRouter(TopKRouter):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__(r, d_model, num_experts, top_k)
        self.inhibition = PopulationStatistics(d_model, r.get("mode", "subtractive"), r.get("momentum", 0.99),
                                               r.get("rank", 1))

    def forward(self, x_TD, stream_TD):
        u_TD = self.inhibition.inhibit(x_TD, self.r.get("alpha", 1.0), self.r.get("eps", 1e-5))
        idx_TK, w_TK = self.route(u_TD)
        return idx_TK, w_TK, stream_TD


class FixedProjectionRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k, self.num_experts, self.d_model = r, top_k, num_experts, d_model
        self.from_stream = r.get("source", "hidden") == "embedding"
        self.register_buffer("v_projection", torch.zeros(d_model if self.from_stream else num_experts, d_model))
        self.stream_k = max(1, round(r.get("stream_active_fraction", 0.5) * d_model))
        self.center = (PopulationStatistics(d_model, "subtractive", r.get("center_momentum", 0.99), 1)
                       if r.get("center", False) else None)
        self.register_buffer("selection_bias_E", torch.zeros(num_experts))

    def forward(self, x_TD, stream_TD):
        u_TD = stream_TD.reshape(-1, self.d_model).detach().float() if self.from_stream else x_TD.float()
        if self.center is not None:
            u_TD = self.center.inhibit(u_TD, 1.0, 1e-5)
        if self.from_stream:
            c_TD = u_TD @ self.v_projection.t()
            winners = torch.topk(c_TD, self.stream_k, dim=-1).indices
            stream_TD = torch.zeros_like(c_TD).scatter_(-1, winners, 1.0) * c_TD
            scores_TE = stream_TD.view(-1, self.num_experts, self.d_model // self.num_experts).sum(-1)
        else:
            scores_TE = u_TD @ self.v_projection.t()
        select_TE = scores_TE + self.selection_bias_E if self.r.get("bias_balancing", False) else scores_TE
        idx_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
        chosen_TK = scores_TE.gather(1, idx_TK)
        if self.r.get("weights", "uniform") == "softmax":
            w_TK = torch.softmax(chosen_TK, dim=-1)
        else:
            w_TK = torch.ones_like(chosen_TK)
        return idx_TK, w_TK, stream_TD


class AttentiveRouter(nn.Module):
    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.r, self.top_k = r, top_k
        hidden = r.get("hidden", 32)
        self.act = GATE_ACTIVATIONS[r.get("activation", "relu")]
        self.gate_trunk = nn.Linear(d_model, hidden)
        self.w_q = nn.Linear(hidden, hidden, bias=False)
        self.w_k = nn.Linear(hidden, hidden, bias=False)
        self.probes_EJD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(self, x_TD, stream_TD):
        x = x_TD.float()
        q_TJ = F.linear(self.act(F.linear(x, self.gate_trunk.weight.float(), self.gate_trunk.bias.float())),
                        self.w_q.weight.float())
        probe_TEJ = self.act(torch.einsum("td,ejd->tej", x, self.probes_EJD.float()))
        k_TEJ = F.linear(probe_TEJ, self.w_k.weight.float())
        scores_TE = torch.einsum("tj,tej->te", q_TJ, k_TEJ) / math.sqrt(q_TJ.shape[-1])
        idx_TK, w_TK = topk_from_logits(scores_TE, self.top_k, self.r.get("renormalize", False))
        return idx_TK, w_TK, stream_TD


class HashRouter(nn.Module):
    reads_token_ids = True

    def __init__(self, r, d_model, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.register_buffer("table_VK", torch.zeros(r["vocab_size"], top_k, dtype=torch.long))

    def forward(self, x_TD, stream_TD, token_ids_T):
        idx_TK = self.table_VK[token_ids_T.reshape(-1)]
        w_TK = torch.full(idx_TK.shape, 1.0 / self.top_k, dtype=torch.float32, device=x_TD.device)
        return idx_TK, w_TK, stream_TD


ROUTERS = {"topk": TopKRouter, "inhibition": InhibitionRouter, "fixed_projection": FixedProjectionRouter,
           "attentive": AttentiveRouter, "hash": HashRouter}
