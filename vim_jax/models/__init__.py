"""Vim model definitions."""

from vim_jax.models.registry import VARIANTS, create_model, model_config
from vim_jax.models.vim import BiMambaMixer, Block, ModelConfig, PatchEmbed, VisionMamba

__all__ = [
  "VARIANTS",
  "BiMambaMixer",
  "Block",
  "ModelConfig",
  "PatchEmbed",
  "VisionMamba",
  "create_model",
  "model_config",
]
