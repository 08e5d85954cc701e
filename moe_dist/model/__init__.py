"""The decoder-only MoE transformer language model."""

from moe_dist.model.config import ModelConfig, parse_model_config
from moe_dist.model.transformer import ModelOutput, MoETransformer

__all__ = ["ModelConfig", "ModelOutput", "MoETransformer", "parse_model_config"]
