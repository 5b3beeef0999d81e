"""Named Vim variants, as registered by the official code (vim_spec.md §3), and the DeiT baselines."""

from __future__ import annotations

import dataclasses

from flax import nnx

from vim_jax.models.deit import DeiT, DeiTConfig
from vim_jax.models.vim import ModelConfig, VisionMamba

# embed_dim and stride per name; everything else is common to all released models.
VARIANTS: dict[str, dict] = {
  "vim_tiny": dict(embed_dim=192, stride=16),
  "vim_tiny_stride8": dict(embed_dim=192, stride=8),
  "vim_small": dict(embed_dim=384, stride=16),
  "vim_small_stride8": dict(embed_dim=384, stride=8),
  "vim_base": dict(embed_dim=768, stride=16),
}

# timm's deit_{tiny,small,base}_patch16_224: width and heads; depth 12 and patch 16 are common.
DEIT_VARIANTS: dict[str, dict] = {
  "deit_tiny": dict(embed_dim=192, num_heads=3),
  "deit_small": dict(embed_dim=384, num_heads=6),
  "deit_base": dict(embed_dim=768, num_heads=12),
}

# name -> (config class, model class, fields of the name).
_MODELS = {name: (ModelConfig, VisionMamba, fields) for name, fields in VARIANTS.items()} | {
  name: (DeiTConfig, DeiT, fields) for name, fields in DEIT_VARIANTS.items()
}


def model_config(
  name: str, *, num_classes: int = 1000, img_size: int | tuple[int, int] = 224, **overrides
) -> ModelConfig | DeiTConfig:
  """The config of a named variant, with any field overridden."""
  if name not in _MODELS:
    raise ValueError(f"unknown model name {name!r}; expected one of {sorted(_MODELS)}")
  config_cls, _, variant = _MODELS[name]
  fields = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:  # the official constructor swallows typos (vim_spec.md §7.3); we do not.
    raise TypeError(f"unknown {config_cls.__name__} field(s) {unknown} for {name!r}; valid fields: {sorted(fields)}")
  values = dict(variant, num_classes=num_classes, img_size=img_size)
  values.update(overrides)
  return config_cls(**values)


def create_model(
  name: str,
  *,
  num_classes: int = 1000,
  img_size: int | tuple[int, int] = 224,
  rngs: nnx.Rngs | None = None,
  **overrides,
) -> VisionMamba | DeiT:
  """Build a freshly initialised named model, e.g. `create_model("vim_tiny", dtype="bfloat16")`."""
  cfg = model_config(name, num_classes=num_classes, img_size=img_size, **overrides)
  return _MODELS[name][1](cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
