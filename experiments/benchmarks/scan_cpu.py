r"""The plain-XLA scan on CPU: what to run inside each chunk (`xla.scan`'s within_chunk), against the reference.

  PYTHONPATH=. python experiments/benchmarks/scan_cpu.py --out=experiments/results/scan_cpu_within_chunk.json

One direction of the recurrence alone (float32, ready inputs), forward+backward (gradients of all five arrays),
forward and reverse, at the demo's shapes and at Vim-Ti's with a small batch: the best of --rounds rounds of
--reps calls. Prints the CPU and its core count.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from kernels.selective_scan import reference, xla

_SHAPES = {"demo": (64, 17, 128, 8), "vim_tiny_224_b8": (8, 197, 384, 16)}  # (batch, length, channels, state)
_REPS = flags.DEFINE_integer("reps", 5, "Calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the best is kept.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _inputs(batch: int, length: int, channels: int, state: int) -> tuple:
  keys = jax.random.split(jax.random.key(0), 5)
  u = jax.random.normal(keys[0], (batch, length, channels))
  delta = jax.nn.softplus(jax.random.normal(keys[1], (batch, length, channels)))
  A = -jnp.exp(jax.random.normal(keys[2], (channels, state)))
  B, C = (jax.random.normal(k, (batch, length, state)) for k in keys[3:])
  return u, delta, A, B, C


def _best_ms(scan, inputs, reverse: bool) -> float:
  loss = lambda *a: jnp.sum(scan(*a, reverse=reverse)[0] ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
  jax.block_until_ready(grads(*inputs))
  best = float("inf")
  for _ in range(_ROUNDS.value):
    start = time.perf_counter()
    for _ in range(_REPS.value):
      out = grads(*inputs)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / _REPS.value * 1e3)
  return best


def _cpu_name() -> str:
  """The CPU's model name (Linux), else the machine type."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def main(_):
  scans = {
    "xla associative": functools.partial(xla.scan, within_chunk="associative"),
    "xla sequential": functools.partial(xla.scan, within_chunk="sequential"),
    "reference": reference.scan,
  }
  device = f"{_cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}"
  print(f"# forward+backward ms, float32, {device}")
  results = {"device": device, "cases": []}
  for case, shape in _SHAPES.items():
    inputs = _inputs(*shape)
    for name, scan in scans.items():
      times = {direction: _best_ms(scan, inputs, direction == "reverse") for direction in ("forward", "reverse")}
      results["cases"].append({"case": case, "shape": shape, "scan": name, **times})
      print(f"{case:16s} {name:16s} forward {times['forward']:8.2f}  reverse {times['reverse']:8.2f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
