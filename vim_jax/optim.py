"""AdamW with the official (DeiT/timm) parameter groups and learning-rate schedule (vim_spec.md §5.2)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# timm `create_optimizer` -> `add_weight_decay`: no decay for ndim <= 1 (biases, norms, D) and for
# the names in `model.no_weight_decay()`. A_log (2-D) and the conv kernels *are* decayed, as officially.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def weight_decay_mask(params) -> object:
  """True where weight decay applies, as a pytree like `params`."""

  def decays(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def scaled_lr(base_lr: float, global_batch: int, unscale: bool = False) -> float:
  """The official linear scaling rule: lr · global_batch / 512 (main.py L388–390)."""
  return base_lr if unscale else base_lr * global_batch / 512


def lr_schedule(
  *,
  peak_lr: float,
  total_steps: int,
  steps_per_epoch: int,
  warmup_epochs: float,
  warmup_lr: float = 1e-6,
  min_lr: float = 1e-5,
  per_epoch: bool = False,
) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from `warmup_lr`, then cosine to `min_lr` at `total_steps`.

  `per_epoch=True` reproduces the official timm scheduler exactly: stepped once per epoch after the
  epoch, so epochs 0 and 1 both run at `warmup_lr` and epoch e >= 1 at lr(e − 1), with the cosine over
  the whole run (warmup not subtracted). The default is the smooth per-step version of the same curve.
  """
  total_epochs = total_steps / steps_per_epoch

  def curve(t):  # t in epochs
    warm = warmup_lr + t * (peak_lr - warmup_lr) / max(warmup_epochs, 1e-9)
    cos = min_lr + 0.5 * (peak_lr - min_lr) * (1 + jnp.cos(math.pi * t / total_epochs))
    return jnp.where(t < warmup_epochs, warm, cos)

  def schedule(step):
    if per_epoch:
      epoch = step // steps_per_epoch
      return curve(jnp.maximum(epoch - 1, 0).astype(jnp.float32))
    return curve(step / steps_per_epoch)

  return schedule


def make_optimizer(optim_cfg, *, schedule: Callable, params) -> optax.GradientTransformation:
  """AdamW (β 0.9/0.999, eps 1e-8 by default) with the weight-decay mask, optional gradient clipping."""
  parts = []
  if optim_cfg.get("clip_grad"):
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad))
  parts.append(
    optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=weight_decay_mask(params),
    )
  )
  return optax.chain(*parts)
