r"""A/B of the trainer's own step: per-parameter vs flattened Adam and gradient norm, jax.random.beta vs mixup.beta.

  PYTHONPATH=. python experiments/benchmarks/trainer_step_ab.py --out=experiments/results/ab_trainer_step_h200.json

All variants are compiled first, in one process; then rounds alternate between them, each round queueing
--steps steps back to back after a warm-up step (`model_steps.time_per_call`; the trainer's loop queues them so
too) and timing to the last one's end, so clock and thermal drift hit every variant alike. The last round
runs with Python's garbage collector off. The variants patch the `flatten` of `optim.make_optimizer` and
`optim.global_norm`, and `mixup.beta`; everything else is the trainer's step on Vim-Ti with a fixed random batch.
"""

from __future__ import annotations

import gc
import json

import jax
from absl import app, flags

from experiments.benchmarks.model_steps import Step, time_per_call, trainer_step
from vim_jax import optim
from vim_jax.data import mixup

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Rounds per variant; the last with gc off.")
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


def main(argv):
  del argv
  variants = {name: _compile(*flags_) for name, flags_ in VARIANTS.items()}
  optim.make_optimizer, optim.global_norm, mixup.beta = _MAKE_OPTIMIZER, _GLOBAL_NORM, _LOOP_FREE_BETA
  results = {name: {"gc_on": [], "gc_off": []} for name in VARIANTS}
  for r in range(_ROUNDS.value):
    last = r == _ROUNDS.value - 1
    for name, step in variants.items():
      if last:
        gc.disable()
      seconds, args = time_per_call(step, _STEPS.value)
      gc.enable()
      variants[name] = step._replace(args=args)  # the next round continues from this state
      results[name]["gc_off" if last else "gc_on"].append(round(seconds * 1e3, 2))
      print(f"round {r} {name}: {seconds * 1e3:.2f} ms/step", flush=True)
  out = {
    "device": jax.devices()[0].device_kind,
    "jax": jax.__version__,
    "what": f"trainer train step, Vim-Ti {_IMAGE_SIZE.value}² batch {_BATCH.value}, {_STEPS.value} steps back to "
    "back after a warm-up step, ms per step per round; rounds alternate variants",
    "results": results,
  }
  print(json.dumps(out))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
