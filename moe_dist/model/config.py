"""Typed, strict configuration of the decoder-only MoE language model (`model:` and `moe:` sections).

The `moe:` section is a `MoEConfig` parsed by `MoEConfig.from_dict` (its router config is
polymorphic). Its `d_model` is the model's: it may be left out and is filled in, and a value that
differs is an error, so the width has one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_dist.common.config import ConfigError, check, check_choice, check_int, from_dict
from moe_dist.moe.config import ACTIVATIONS, MoEConfig
from moe_dist.model.rope_scaling import RopeScalingConfig
from moe_dist.moe.recompute import RECOMPUTE_MODES

QK_NORMS = ("none", "head", "full")
ATTENTIONS = ("mha", "mla")
_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # hidden width of the dense FFN layers (per SwiGLU branch)
    max_seq_len: int = 2048
    # Key/value heads (grouped-query attention; 1: multi-query). None: n_heads (multi-head).
    # Resolved in __post_init__, so after parsing it is always an int (as is head_dim).
    n_kv_heads: int | None = None
    # Width of one attention head. None: d_model // n_heads. The attention's inner width
    # n_heads * head_dim may differ from d_model (Qwen3).
    head_dim: int | None = None
    # RMSNorm of queries and keys before rotary: "head" (one weight of width head_dim shared by
    # the heads, Qwen3-MoE) or "full" (over the whole q and the whole k projection, OLMoE).
    qk_norm: str = "none"
    qkv_bias: bool = False  # a bias on the fused q/k/v projection (Qwen2)
    # "mha": standard (multi-head / grouped-query) attention, attention.py; "mla": DeepSeek-V2/V3's
    # multi-head latent attention, latent_attention.py, sized by the five keys below (only there).
    attention: str = "mha"
    # Rotate only each head's first fraction of dims (GLM-4.5: 0.5); mha only.
    partial_rotary_factor: float = 1.0
    # mla: the query's low-rank width (None: a full-rank query projection, as DeepSeek-V2-Lite),
    # the joint key-value latent's width, each head's rotary and non-rotary query/key widths and its
    # value width. head_dim is then the query/key width qk_nope_head_dim + qk_rope_head_dim.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Rotary scaling (YaRN: rope_scaling.py); None: plain RoPE.
    rope_scaling: RopeScalingConfig | None = None
    # Layer i has an MoE FFN when i >= moe_offset and (i - moe_offset) % moe_every == 0;
    # moe_every 0 (or no `moe:` section) makes every layer dense.
    moe_every: int = 1
    moe_offset: int = 0
    activation: str = "swiglu"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Number of domain classes carried by the data (domain_ids in [0, num_labels)); 0 disables
    # the I(expert; domain) statistics.
    num_labels: int = 0
    # Recompute attention (and dense FFNs) in backward to save activation memory.
    activation_checkpointing: bool = False
    # What of the MoE layers' expert work is recomputed in backward instead of kept: "none",
    # "activation" (the experts' activation only) or "experts" (the whole expert FFNs); the
    # router, dispatch and statistics never are (moe_dist/moe/recompute.py).
    moe_recompute: str = "none"
    # Multi-token prediction (DeepSeek-V3, moe_dist/model/mtp.py, docs/training.md): 0, or 1 extra
    # block (layer index n_layers) that predicts token t+2; its loss, times mtp_loss_weight, is
    # added to the training loss.
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.3
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"model.{name} must be an integer >= 1, got {value!r}")
        check_choice("model.attention", self.attention, ATTENTIONS)
        if self.attention == "mla":
            self._check_latent_attention()
        else:
            given = [k for k in _MLA_KEYS if getattr(self, k) is not None]
            check(not given, f"model.{', model.'.join(given)} size latent attention; set model.attention: mla "
                             f"(model.attention is {self.attention!r})")
        check(isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1,
              f"model.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = from_dict(RopeScalingConfig, self.rope_scaling, "model.rope_scaling")
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0,
                  f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), "
                  f"or set model.head_dim")
            self.head_dim = self.d_model // self.n_heads
        check_int("model.head_dim", self.head_dim, 2)
        if self.attention == "mha" and self.partial_rotary_factor == 1.0:
            check(self.head_dim % 2 == 0, f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        check(self.rotary_dim % 2 == 0 and self.rotary_dim >= 2,
              f"the rotated width of a head ({self.rotary_dim}: model.head_dim {self.head_dim} x "
              f"partial_rotary_factor {self.partial_rotary_factor}, or model.qk_rope_head_dim) must be even and "
              f">= 2 for rotary embeddings")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        check_int("model.n_kv_heads", self.n_kv_heads, 1)
        check(self.n_heads % self.n_kv_heads == 0,
              f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        check_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        check(isinstance(self.qkv_bias, bool), f"model.qkv_bias must be true or false, got {self.qkv_bias!r}")
        check(isinstance(self.moe_every, int) and self.moe_every >= 0,
              f"model.moe_every must be an integer >= 0, got {self.moe_every!r}")
        check(isinstance(self.moe_offset, int) and 0 <= self.moe_offset < self.n_layers,
              f"model.moe_offset ({self.moe_offset!r}) must be an integer in [0, n_layers "
              f"({self.n_layers}))")
        check_choice("model.activation", self.activation, ACTIVATIONS)
        check_choice("model.moe_recompute", self.moe_recompute, RECOMPUTE_MODES)
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta!r}")
        check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps!r}")
        check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std!r}")
        check(isinstance(self.num_labels, int) and self.num_labels >= 0,
              f"model.num_labels must be an integer >= 0, got {self.num_labels!r}")
        check_int("model.mtp_layers", self.mtp_layers, 0)
        check(self.mtp_layers <= 1,
              f"model.mtp_layers is {self.mtp_layers}, but only 0 or 1 is implemented: DeepSeek-V3's chain of "
              f"modules (module k predicting token t+1+k from module k-1's output) is not; DeepSeek-V3 itself "
              f"trains and ships with 1")
        check(isinstance(self.mtp_loss_weight, (int, float)) and not isinstance(self.mtp_loss_weight, bool)
              and self.mtp_loss_weight >= 0,
              f"model.mtp_loss_weight must be a number >= 0, got {self.mtp_loss_weight!r}")
        self.check_moe_section()

    def _check_latent_attention(self) -> None:
        for key in _MLA_KEYS[1:]:
            check_int(f"model.{key} (model.attention mla)", getattr(self, key), 1)
        if self.q_lora_rank is not None:
            check_int("model.q_lora_rank", self.q_lora_rank, 1)
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        check(self.head_dim in (None, qk_head_dim),
              f"model.head_dim ({self.head_dim}) must be left out with model.attention mla (it is "
              f"qk_nope_head_dim + qk_rope_head_dim = {qk_head_dim})")
        self.head_dim = qk_head_dim
        check(self.n_kv_heads in (None, self.n_heads),
              f"model.n_kv_heads ({self.n_kv_heads}) must be left out with model.attention mla: every head reads "
              f"the one shared latent")
        check(self.partial_rotary_factor == 1.0,
              f"model.partial_rotary_factor ({self.partial_rotary_factor}) is for model.attention mha; mla's "
              f"rotary width is model.qk_rope_head_dim")
        check(self.qk_norm == "none" and not self.qkv_bias,
              f"model.qk_norm ({self.qk_norm!r}) and model.qkv_bias ({self.qkv_bias}) are for model.attention mha")

    @property
    def rotary_dim(self) -> int:
        """The rotated width of each query/key head."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    def check_moe_section(self) -> None:
        """The rules that tie the `moe:` section to this one. `parse_model_config` attaches the
        section after construction (its d_model default comes from here), so it calls this again."""
        if self.moe is None:
            return
        check(isinstance(self.moe, MoEConfig), f"model.moe must be a MoEConfig, got {self.moe!r}")
        check(self.moe.d_model == self.d_model,
              f"moe.d_model ({self.moe.d_model}) must equal model.d_model ({self.d_model})")
        check(self.moe_every >= 1,
              "model.moe_every is 0 (no MoE layers) but a moe section is given; set "
              "moe_every >= 1 or remove the moe section")
        num_moe = len(self.moe_layer_indices)
        check(self.moe.hash_layers <= num_moe,
              f"moe.hash_layers ({self.moe.hash_layers}) exceeds the model's {num_moe} MoE layers (model.n_layers "
              f"{self.n_layers}, moe_every {self.moe_every}, moe_offset {self.moe_offset})")
        # A hash router's table has a row per token id: the model's vocabulary, one source of truth.
        for where, router in (("moe.router", self.moe.router), ("moe.hash_router", self.moe.hash_router)):
            if router is not None and router.type == "hash":
                if router.vocab_size is None:
                    router.vocab_size = self.vocab_size
                check(router.vocab_size == self.vocab_size,
                      f"{where}.vocab_size ({router.vocab_size}) must equal model.vocab_size ({self.vocab_size})")

    def is_moe_layer(self, layer_index: int) -> bool:
        if self.moe is None or self.moe_every == 0:
            return False
        offset = layer_index - self.moe_offset
        return offset >= 0 and offset % self.moe_every == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def moe_config(self, layer_index: int) -> MoEConfig:
        """The MoE config of MoE layer `layer_index`: its router is `moe.hash_router` in the first
        `moe.hash_layers` MoE layers, `moe.router` after them (the MTP block, layer n_layers, comes
        after every MoE layer of the main model)."""
        indices = self.moe_layer_indices
        return self.moe.for_moe_layer(indices.index(layer_index) if layer_index in indices else len(indices))


def parse_model_config(model: dict[str, Any] | None, moe: dict[str, Any] | None = None) -> ModelConfig:
    """The `model:` and `moe:` sections -> ModelConfig; raises ConfigError on any bad value."""
    model = dict(model or {})
    if "moe" in model:
        raise ConfigError("model.moe: put the MoE settings in a top-level `moe:` section")
    cfg = from_dict(ModelConfig, model, "model")
    if moe is not None:
        moe = dict(moe)
        moe.setdefault("d_model", cfg.d_model)
        cfg.moe = MoEConfig.from_dict(moe, "moe")
        cfg.check_moe_section()
    return cfg
