"""Named Vim variants, as registered by the official code (vim_spec.md §3)."""

from __future__ import annotations

import dataclasses

from flax import nnx

from vim_jax.models.vim import ModelConfig, VisionMamba

# embed_dim and stride per name; everything else is common to all released models.
VARIANTS: dict[str, dict] = {
  "vim_tiny": dict(embed_dim=192, stride=16),
  "vim_tiny_stride8": dict(embed_dim=192, stride=8),
  "vim_small": dict(embed_dim=384, stride=16),
  "vim_small_stride8": dict(embed_dim=384, stride=8),
  "vim_base": dict(embed_dim=768, stride=16),
}


def model_config(
  name: str, *, num_classes: int = 1000, img_size: int | tuple[int, int] = 224, **overrides
) -> ModelConfig:
  """The ModelConfig of a named variant, with any field overridden."""
  if name not in VARIANTS:
    raise ValueError(f"unknown model name {name!r}; expected one of {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:  # the official constructor swallows typos (vim_spec.md §7.3); we do not.
    raise TypeError(f"unknown ModelConfig field(s) {unknown} for {name!r}; valid fields: {sorted(fields)}")
  values = dict(VARIANTS[name], num_classes=num_classes, img_size=img_size)
  values.update(overrides)
  return ModelConfig(**values)


def create_model(
  name: str,
  *,
  num_classes: int = 1000,
  img_size: int | tuple[int, int] = 224,
  rngs: nnx.Rngs | None = None,
  **overrides,
) -> VisionMamba:
  """Build a freshly initialised Vim variant, e.g. `create_model("vim_tiny", dtype="bfloat16")`."""
  cfg = model_config(name, num_classes=num_classes, img_size=img_size, **overrides)
  return VisionMamba(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
