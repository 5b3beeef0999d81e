"""Vim model definitions, and the DeiT baselines."""

from vim_jax.models.deit import DeiT, DeiTConfig
from vim_jax.models.registry import DEIT_VARIANTS, VARIANTS, create_model, model_config
from vim_jax.models.vim import BiMambaMixer, Block, ModelConfig, PatchEmbed, VisionMamba

__all__ = [
  "DEIT_VARIANTS",
  "VARIANTS",
  "BiMambaMixer",
  "Block",
  "DeiT",
  "DeiTConfig",
  "ModelConfig",
  "PatchEmbed",
  "VisionMamba",
  "create_model",
  "model_config",
]
