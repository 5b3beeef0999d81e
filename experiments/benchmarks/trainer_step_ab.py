r"""A/B of the trainer's own step: per-parameter vs flattened Adam and gradient norm, jax.random.beta vs mixup.beta.

  PYTHONPATH=. python experiments/benchmarks/trainer_step_ab.py --out=experiments/results/ab_trainer_step_h200.json

All variants are compiled first, in one process; then rounds alternate between them, each round queueing
--steps steps back to back after a warm-up step (`model_steps.time_per_call`; the trainer's loop queues them so
too) and timing to the last one's end, so clock and thermal drift hit every variant alike. Each variant runs
once per round under each of --gc_modes (Python's garbage collector on, frozen or off), whose collections
are counted and timed. The variants patch the `flatten` of `optim.make_optimizer` and
`optim.global_norm`, and `mixup.beta`; everything else is the trainer's step on Vim-Ti with a fixed random batch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time

import jax
from absl import app, flags

from experiments.benchmarks.model_steps import Step, time_per_call, trainer_step
from vim_jax import optim
from vim_jax.data import mixup

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds per variant and gc mode.")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (default: all of VARIANTS).")
_GC_MODES = flags.DEFINE_list("gc_modes", ["on", "off"], "Python gc during each round: on, frozen, off.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")

_MAKE_OPTIMIZER, _GLOBAL_NORM, _LOOP_FREE_BETA = optim.make_optimizer, optim.global_norm, mixup.beta
VARIANTS = {  # name: (flatten Adam, loop-free beta, flatten the gradient norm)
  "per_param_adam_jax_beta": (False, False, False),
  "flat_adam_jax_beta": (True, False, False),
  "flat_adam_loop_free_beta": (True, True, False),
  "flat_adam_loop_free_beta_flat_norm": (True, True, True),
}


def _compile(flatten_adam: bool, loop_free_beta: bool, flatten_norm: bool) -> Step:
  """One variant's compiled step; the patches only matter while tracing."""
  optim.make_optimizer = lambda *args, flatten=None, **kwargs: _MAKE_OPTIMIZER(*args, **kwargs, flatten=flatten_adam)
  optim.global_norm = lambda tree, flatten=None: _GLOBAL_NORM(tree, flatten=flatten_norm)
  mixup.beta = _LOOP_FREE_BETA if loop_free_beta else jax.random.beta
  return trainer_step("vim_tiny", _IMAGE_SIZE.value, _BATCH.value)


class _GcClock:
  """Python's garbage collections while it is installed: count and seconds per generation."""

  def __init__(self):
    self.collections, self.seconds, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

  def __call__(self, phase: str, info: dict) -> None:
    if phase == "start":
      self._start = time.perf_counter()
    else:
      self.collections[info["generation"]] += 1
      self.seconds[info["generation"]] += time.perf_counter() - self._start


@contextlib.contextmanager
def _gc_mode(mode: str):
  """on: as Python starts; frozen: `gc.freeze()` after a full collection, so that collections skip every object
  alive now (the loaded libraries, the compiled steps); off: `gc.disable()`."""
  if mode not in ("on", "frozen", "off"):
    raise ValueError(f"--gc_modes: each must be on, frozen or off, got {mode!r}")
  if mode == "frozen":
    gc.collect()
    gc.freeze()
  if mode == "off":
    gc.disable()
  clock = _GcClock()
  gc.callbacks.append(clock)
  try:
    yield clock
  finally:
    gc.callbacks.remove(clock)
    gc.enable()
    gc.unfreeze()


def main(argv):
  del argv
  names = _VARIANTS.value or list(VARIANTS)
  variants = {name: _compile(*VARIANTS[name]) for name in names}
  optim.make_optimizer, optim.global_norm, mixup.beta = _MAKE_OPTIMIZER, _GLOBAL_NORM, _LOOP_FREE_BETA
  results = {name: {mode: [] for mode in _GC_MODES.value} for name in names}
  collections = {name: {mode: [] for mode in _GC_MODES.value} for name in names}
  for r in range(_ROUNDS.value):
    for name, step in variants.items():
      for mode in _GC_MODES.value:
        with _gc_mode(mode) as clock:
          seconds, args = time_per_call(step, _STEPS.value)
        step = step._replace(args=args)
        results[name][mode].append(round(seconds * 1e3, 2))
        collections[name][mode].append({"per_generation": clock.collections, "ms": round(1e3 * sum(clock.seconds), 1)})
        print(
          f"round {r} {name}, gc {mode}: {seconds * 1e3:.2f} ms/step; collections {clock.collections}, "
          f"{1e3 * sum(clock.seconds):.1f} ms in them",
          flush=True,
        )
      variants[name] = step  # the next round continues from this state
  out = {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "what": f"trainer train step, Vim-Ti {_IMAGE_SIZE.value}² batch {_BATCH.value}, {_STEPS.value} steps back to "
    "back after a warm-up step, ms per step per round and gc mode; rounds alternate variants",
    "results": results,
    "gc_collections": collections,
  }
  print(json.dumps(out))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
