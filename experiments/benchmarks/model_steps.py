"""Compiled inference and training steps of a model, and their timing: shared by throughput.py, profile_step.py,
trainer_step_ab.py and memory_offline.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vim_jax import config_base, optim, sharding, trainer
from vim_jax.models import DEIT_VARIANTS, create_model


class Step(NamedTuple):
  """`call(args) -> (next args, output)`; `args` to start from; `compiled` for XLA's memory analysis."""

  call: Callable[[tuple], tuple[tuple, Any]]
  args: tuple
  compiled: jax.stages.Compiled


def create_model_spec(spec: str, size: int) -> nnx.Module:
  """The bf16 model that a benchmark's `name[:impl][:scanned]` names (throughput.py's docstring), for `size`² images."""
  name, impl, *options = spec.split(":") + [""]
  options = [o for o in options if o]
  if any(o != "scanned" for o in options):
    raise ValueError(f"--models: {spec!r}: the only option after name:impl is 'scanned', got {options}")
  field = "attention_impl" if name in DEIT_VARIANTS else "scan_impl"
  return create_model(name, img_size=size, dtype="bfloat16", scan_layers="scanned" in options, **{field: impl or None})


class Program(NamedTuple):
  """A step as a function, its arguments and which of them it donates: what `jax.jit` compiles."""

  fn: Callable
  args: tuple
  donate_argnums: tuple[int, ...] = ()

  def compile(self) -> jax.stages.Compiled:
    return jax.jit(self.fn, donate_argnums=self.donate_argnums).lower(*self.args).compile()


def _images(model: nnx.Module, batch: int) -> jax.Array:
  return jax.random.normal(jax.random.key(0), (batch, *model.cfg.img_size, model.cfg.in_chans), jnp.float32)


def forward_program(model: nnx.Module, batch: int) -> Program:
  """Logits of a random batch (the model's own compute dtype, no dropout)."""
  graphdef, params = nnx.split(model)

  def logits(params, images):
    return nnx.merge(graphdef, params)(images)

  return Program(logits, (params, _images(model, batch)))


def train_program(model: nnx.Module, batch: int, learning_rate: float = 1e-3) -> Program:
  """Forward, backward and the trainer's AdamW (vim_jax.optim.adamw, weight-decay mask, flattened Adam as in
  the data-parallel trainer) on a random batch with random labels; parameters and optimizer state donated."""
  graphdef, params = nnx.split(model)
  tx = optim.adamw(learning_rate, weight_decay=0.05, mask=optim.weight_decay_mask(params), flatten=True)

  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  labels = jax.random.randint(jax.random.key(1), (batch,), 0, model.cfg.num_classes)
  return Program(step, (params, tx.init(params), _images(model, batch), labels), donate_argnums=(0, 1))


def forward_step(model: nnx.Module, batch: int) -> Step:
  """`forward_program`, compiled."""
  program = forward_program(model, batch)
  compiled = program.compile()
  return Step(lambda args: (args, compiled(*args)), program.args, compiled)


def train_step(model: nnx.Module, batch: int, learning_rate: float = 1e-3) -> Step:
  """`train_program`, compiled."""
  program = train_program(model, batch, learning_rate)
  compiled = program.compile()

  def call(args):
    params, opt_state, loss = compiled(*args)
    return (params, opt_state, *args[2:]), loss

  return Step(call, program.args, compiled)


def trainer_step(
  model_name: str, image_size: int, batch: int, devices: list | None = None, scan_impl: str | None = None
) -> Step:
  """vim_jax.trainer's own jitted step for the ImageNet recipe of `model_name` (mixup/cutmix, label smoothing,
  drop path, AdamW with the official parameter groups, EMA) on `devices` (default: the first one) and a fixed
  random global batch (seed 0: the same images for the same `batch` on any number of devices)."""
  config = config_base.imagenet_config(model_name, batch_size=batch)
  config.data.name = "digits"  # only for dataset_info; the batch is synthetic
  config.data.image_size = image_size
  config.model.num_classes = 1000
  config.model.scan_impl = scan_impl
  exp = trainer.Experiment.create(config, devices=devices or jax.devices()[:1])
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  labels = rng.integers(0, 1000, size=batch).astype(np.int32)
  with jax.set_mesh(exp.mesh):
    state = exp.init_state()
    global_batch = sharding.global_batch({"image": images, "label": labels}, exp.mesh)
    compiled = exp.jitted()[0].lower(state, global_batch).compile()

  def call(args):
    state, metrics = compiled(*args)
    return (state, args[1]), metrics

  return Step(call, (state, global_batch), compiled)


def time_per_call(step: Step, reps: int) -> tuple[float, tuple]:
  """Seconds per call over `reps` calls queued back to back after one warm-up call, and the args to go on with."""
  args, out = step.call(step.args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(reps):
    args, out = step.call(args)
  jax.block_until_ready((args, out))
  return (time.perf_counter() - start) / reps, args


def alternate_rounds(case: dict, steps: dict, rounds_of: int = 4, reps: int = 10) -> None:
  """Times the compiled `steps` ({code: Step}) in `rounds_of` rounds of `reps` calls, alternating between them (an
  A/B in one process: drift hits every code alike), and prints one JSON line per code: `case`, every round's ms per
  call, their median and XLA's temporary memory."""
  rounds = {code: [] for code in steps}
  for _ in range(rounds_of):
    for code, step in steps.items():
      seconds, args = time_per_call(step, reps)
      steps[code] = step._replace(args=args)
      rounds[code].append(round(seconds * 1e3, 3))
  for code, step in steps.items():
    temp = step.compiled.memory_analysis().temp_size_in_bytes / 2**20
    row = case | {"code": code, "ms_rounds": rounds[code], "median_ms": float(np.median(rounds[code]))}
    print(json.dumps(row | {"temp_mib": round(temp, 1)}), flush=True)
