"""Mixup / CutMix with label smoothing on device, as timm's `Mixup` in mode 'batch' (vim_spec.md §5.2).

Runs inside the jitted train step on the global batch, so it costs no host time and is a pure
function of the step's rng: a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0  # probability that a batch is mixed at all
  switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
  label_smoothing: float = 0.1
  num_classes: int = 1000


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm `one_hot(..., on=1 − s + s/K, off=s/K)`."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_mask(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """timm `rand_bbox` + `correct_lam`: a box of area ≈ (1 − lam)·H·W, clipped at the borders.

  Returns the (H, W) mask of the box (True = take the other image) and the corrected lam.
  """
  cut_rat = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut_rat).astype(jnp.int32), (width * cut_rat).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy, cx = jax.random.randint(ky, (), 0, height), jax.random.randint(kx, (), 0, width)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  corrected = 1.0 - ((y2 - y1) * (x2 - x1)) / (height * width)
  return mask, corrected.astype(jnp.float32)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, cfg: MixupConfig) -> tuple[jax.Array, jax.Array]:
  """Mixed NHWC images and soft targets (batch, num_classes); each sample is paired with its mirror
  in the batch (`x.flip(0)`), one lam per batch, as timm's mode 'batch'."""
  targets = smooth_one_hot(labels, cfg.num_classes, cfg.label_smoothing)
  use_mixup, use_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
  if not (use_mixup or use_cutmix) or cfg.prob <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(k_apply) < cfg.prob
  if use_mixup and use_cutmix:
    cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  else:
    cutmix = jnp.asarray(use_cutmix)
  lam_mix = jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha) if use_mixup else 1.0
  lam_cut = jax.random.beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix else 1.0
  lam = jnp.where(cutmix, lam_cut, lam_mix).astype(jnp.float32)
  box, lam_box = _cutmix_mask(k_box, lam, images.shape[1], images.shape[2])
  lam = jnp.where(apply, jnp.where(cutmix, lam_box, lam), 1.0)
  flipped = images[::-1]
  blended = images * lam.astype(images.dtype) + flipped * (1 - lam).astype(images.dtype)
  pasted = jnp.where(box[None, :, :, None], flipped, images)
  mixed = jnp.where(apply, jnp.where(cutmix, pasted, blended), images)
  return mixed, targets * lam + targets[::-1] * (1.0 - lam)
