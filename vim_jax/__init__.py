"""vim_jax: Vision Mamba (Vim) in JAX/Flax NNX, exact to the official PyTorch model."""

from vim_jax.checkpointing import load_model, save_model
from vim_jax.models import ModelConfig, VisionMamba, create_model, model_config
from vim_jax.official import load_official, save_official

__all__ = [
  "ModelConfig",
  "VisionMamba",
  "create_model",
  "load_model",
  "load_official",
  "model_config",
  "save_model",
  "save_official",
]
