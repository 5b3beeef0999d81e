"""Mixup / CutMix with label smoothing on device, as timm's `Mixup` in mode 'batch' (vim_spec.md §5.2).

Runs inside the jitted train step on the global batch, so it costs no host time and is a pure
function of the step's rng: a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Gamma draws tried at once by `beta`: each is accepted with probability >= 0.95, so all fail with < 1e-20.
GAMMA_CANDIDATES = 16


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0  # probability that a batch is mixed at all
  switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
  label_smoothing: float = 0.1
  num_classes: int = 1000


def beta(key: jax.Array, a: float, b: float) -> jax.Array:
  """One Beta(a, b) draw as X / (X + Y) of Gamma draws, without `jax.random.beta`'s rejection `while_loop`.

  On GPU each iteration of that loop copies its condition to the host, which then waits for the device before
  it queues more: 17 round trips per Vim-Ti training step, 1-7 ms of it at 224², batch 128 on an H200.
  """
  k_x, k_y = jax.random.split(key)
  return jax.nn.sigmoid(_log_gamma(k_x, a) - _log_gamma(k_y, b))  # X / (X + Y), in logs: tiny a and b underflow


def _log_gamma(key: jax.Array, a: float) -> jax.Array:
  """log of a Gamma(a) draw by Marsaglia and Tsang's method (a < 1 boosted: Gamma(a + 1) · U^(1/a)), its
  rejection step run on `GAMMA_CANDIDATES` proposals at once, keeping the first accepted."""
  k_normal, k_accept, k_boost = jax.random.split(key, 3)
  d = (a + 1.0 if a < 1 else a) - 1.0 / 3.0
  x = jax.random.normal(k_normal, (GAMMA_CANDIDATES,))
  v = (1.0 + x / jnp.sqrt(9.0 * d)) ** 3
  log_v = jnp.log(jnp.where(v > 0, v, 1.0))
  log_u = jnp.log(jax.random.uniform(k_accept, (GAMMA_CANDIDATES,)))
  accepted = (v > 0) & (log_u < 0.5 * x**2 + d - d * v + d * log_v)
  log_sample = jnp.log(d) + log_v[jnp.argmax(accepted)]
  if a < 1:
    log_sample = log_sample + jnp.log(jax.random.uniform(k_boost)) / a
  return log_sample


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
  lam_mix = beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha) if use_mixup else 1.0
  lam_cut = beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix else 1.0
  lam = jnp.where(cutmix, lam_cut, lam_mix).astype(jnp.float32)
  box, lam_box = _cutmix_mask(k_box, lam, images.shape[1], images.shape[2])
  lam = jnp.where(apply, jnp.where(cutmix, lam_box, lam), 1.0)
  flipped = images[::-1]
  blended = images * lam.astype(images.dtype) + flipped * (1 - lam).astype(images.dtype)
  pasted = jnp.where(box[None, :, :, None], flipped, images)
  mixed = jnp.where(apply, jnp.where(cutmix, pasted, blended), images)
  return mixed, targets * lam + targets[::-1] * (1.0 - lam)
