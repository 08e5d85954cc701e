"""Configuration of a moe_dist MoE language model exported for Hugging Face transformers.

Written by moe_dist's `export-hf`; self-contained (torch and transformers only). `moe_dist_model`
and `moe_dist_moe` are moe_dist's resolved `model:` and `moe:` config sections, unchanged, so
the modeling file computes exactly what moe_dist computes; the usual HF fields are derived from
them for tools that read config.json.
"""

from transformers import PretrainedConfig


class MoEDistConfig(PretrainedConfig):
    model_type = "moe_dist"

    def __init__(self, moe_dist_model=None, moe_dist_moe=None, **kwargs):
        self.moe_dist_model = dict(moe_dist_model or {})
        self.moe_dist_moe = dict(moe_dist_moe) if moe_dist_moe else None
        m = self.moe_dist_model
        self.vocab_size = m.get("vocab_size")
        self.hidden_size = m.get("d_model")
        self.num_hidden_layers = m.get("n_layers")
        self.num_attention_heads = m.get("n_heads")
        self.max_position_embeddings = m.get("max_seq_len")
        # The model ties the LM head to the embedding itself (moe_dist_model.tie_embeddings);
        # transformers' own tying machinery must stay out of it.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
