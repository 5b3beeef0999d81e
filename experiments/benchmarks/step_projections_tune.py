r"""Sweeps the step-projections kernel's launch parameters at Vim-Ti shapes (both directions, bf16), against
XLA's four matmuls and a copy of the same bytes of u.

  PYTHONPATH=. python experiments/benchmarks/step_projections_tune.py > step_projections_tune.txt

Each line: microseconds per call (the best of 3 rounds of --reps calls queued back to back) and the bytes
that must cross memory (both u read, both delta and projected written) per second. Settings whose shared
memory exceeds the GPU's fail to compile and are printed as such.
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.kernel_settings import each_setting
from kernels import step_projections

_REPS = flags.DEFINE_integer("reps", 100, "Calls per round.")
_CASES = ((128, 197), (32, 6085))  # (batch, length): 224², batch 128 and 1248², batch 32
_SETTINGS = {  # module constant: values swept (every combination)
  "PROGRAMS": (66, 132),
  "NUM_STAGES": (2, 3),
  "BLOCK_ROWS": (32, 64),
  "NUM_WARPS": (4, 8),
  "BLOCK_CHANNELS": (64, 128),
}
RANK = 16


def _seconds(fn, *args) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(_REPS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / _REPS.value)
  return min(rounds)


def _xla(u_f, u_b, packed):
  """The model's XLA path: x_proj, then dt_proj over the whole output with zero rows for B's and C's columns."""
  width = packed.shape[2] - RANK
  outs = []
  for u, weights in zip((u_f, u_b), packed):
    projected = jnp.dot(u, weights[:, :width], preferred_element_type=jnp.float32).astype(u.dtype)
    dt_proj = jnp.pad(weights[:, width:].T, ((0, width - RANK), (0, 0)))
    outs.append((projected, jnp.dot(projected, dt_proj, preferred_element_type=jnp.float32).astype(u.dtype)))
  return outs


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  for batch, length in _CASES:
    keys = jax.random.split(jax.random.key(0), 3)
    u_f, u_b = (jax.random.normal(k, (batch, length, 384), jnp.bfloat16) for k in keys[:2])
    packed = (jax.random.normal(keys[2], (2, 384, 48 + RANK)) * 0.05).astype(jnp.bfloat16)
    megabytes = 2 * (2 * batch * length * 384 * 2 + batch * length * 48 * 2) / 1e6
    case = f"{batch}x{length}"
    seconds = _seconds(jax.jit(lambda a, b: (a * 2, b * 2)), u_f, u_b)
    print(f"{case} copy of both u: {seconds * 1e6:.0f} us ({4 * batch * length * 384 * 2 / 1e9 / seconds:.0f} GB/s)")
    seconds = _seconds(jax.jit(_xla), u_f, u_b, packed)
    print(f"{case} XLA matmuls: {seconds * 1e6:.0f} us ({megabytes / 1e3 / seconds:.0f} GB/s)", flush=True)
    for label in each_setting(step_projections, _SETTINGS):
      try:
        fn = jax.jit(lambda a, b, p: step_projections.project(a, b, p, rank=RANK))
        seconds = _seconds(fn, u_f, u_b, packed)
        print(f"{case} kernel {label}: {seconds * 1e6:.0f} us ({megabytes / 1e3 / seconds:.0f} GB/s)", flush=True)
      except Exception as error:  # noqa: BLE001 (settings past the shared memory fail to compile)
        print(f"{case} kernel {label}: failed ({str(error).splitlines()[0][:120]})", flush=True)


if __name__ == "__main__":
  app.run(main)
