"""Compiled inference and training steps of a model, and their timing: shared by throughput.py and profile_step.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class Step(NamedTuple):
  """`call(args) -> (next args, output)`; `args` to start from; `compiled` for XLA's memory analysis."""

  call: Callable[[tuple], tuple[tuple, Any]]
  args: tuple
  compiled: jax.stages.Compiled


def _images(model: nnx.Module, batch: int) -> jax.Array:
  return jax.random.normal(jax.random.key(0), (batch, *model.cfg.img_size, model.cfg.in_chans), jnp.float32)


def forward_step(model: nnx.Module, batch: int) -> Step:
  """Logits of a random batch (the model's own compute dtype, no dropout)."""
  graphdef, params = nnx.split(model)

  def logits(params, images):
    return nnx.merge(graphdef, params)(images)

  args = (params, _images(model, batch))
  compiled = jax.jit(logits).lower(*args).compile()
  return Step(lambda args: (args, compiled(*args)), args, compiled)


def train_step(model: nnx.Module, batch: int, learning_rate: float = 1e-3) -> Step:
  """Forward, backward and AdamW on a random batch with random labels; parameters and optimizer state donated."""
  graphdef, params = nnx.split(model)
  tx = optax.adamw(learning_rate, weight_decay=0.05)

  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  labels = jax.random.randint(jax.random.key(1), (batch,), 0, model.cfg.num_classes)
  args = (params, tx.init(params), _images(model, batch), labels)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()

  def call(args):
    params, opt_state, loss = compiled(*args)
    return (params, opt_state, *args[2:]), loss

  return Step(call, args, compiled)


def time_per_call(step: Step, reps: int) -> tuple[float, tuple]:
  """Seconds per call over `reps` calls queued back to back after one warm-up call, and the args to go on with."""
  args, out = step.call(step.args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(reps):
    args, out = step.call(args)
  jax.block_until_ready((args, out))
  return (time.perf_counter() - start) / reps, args
