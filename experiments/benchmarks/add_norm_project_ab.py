r"""A block's add + norm and its in_proj as one kernel (`add_norm.add_norm_project`, inference) against the two launches
it replaces (`add_norm.add_norm`, then `layers.matmul_halves`), at Vim-Ti shapes (bf16), over the kernel's launch
settings; checked against the two launches on the card.

  PYTHONPATH=. python experiments/benchmarks/add_norm_project_ab.py > add_norm_project_ab.txt

Each call runs inside a loop of --steps calls on the device, the stream carried from one to the next (as the blocks
carry it: r' written over r, no copy), x and z kept alive by one element each. Each line: microseconds per call (the
best of 3 rounds of 10 loops), and for the kernel the largest difference from the two launches' r' (expected 0)
and x|z (relative to their largest magnitude; the two round y and sum in other orders).
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.kernel_settings import each_setting
from kernels import add_norm
from vim_jax.models import layers

_STEPS = flags.DEFINE_integer("steps", 20, "Calls per loop on the device.")
_ONLY = flags.DEFINE_string("only", "", "JSON {setting: [values]} to sweep instead of _SETTINGS's (others as shipped).")
_CASE_LIST = flags.DEFINE_string("cases", "", "batch x length,... instead of _CASES (e.g. 32x4097,128x197).")
_CASES = ((32, 4097), (32, 6085), (128, 197))  # (batch, length): 1024² and 1248², batch 32; 224², batch 128
_SETTINGS = {  # every combination
  "PROJECT_BLOCK_ELEMENTS": (64 * 192, 32 * 192, 128 * 192),
  "PROJECT_NUM_WARPS": (4, 8),
  "PROJECT_TILE": (128, 64),
}
DIM, EPS = 192, 1e-6


def _inputs(batch: int, length: int):
  keys = jax.random.split(jax.random.key(0), 4)
  residual = jax.random.normal(keys[0], (batch, length, DIM)) * 3
  hidden = jax.random.normal(keys[1], (batch, length, DIM), jnp.bfloat16)
  weight = 1 + 0.1 * jax.random.normal(keys[2], (DIM,))
  projection = (jax.random.normal(keys[3], (DIM, 4 * DIM)) * DIM**-0.5).astype(jnp.bfloat16)
  return residual, hidden, weight, projection


def _separate(residual, hidden, weight, projection):
  return layers.add_norm_then_in_proj(residual, hidden, weight, projection, eps=EPS, precision=None, interpret=False)


def _fused(residual, hidden, weight, projection):
  return add_norm.add_norm_project(residual, hidden, weight, projection, eps=EPS)


def _looped(call):
  """`--steps` calls in one device loop: each call's r' is the next one's residual."""

  @jax.jit
  def run(residual, hidden, weight, projection):
    def step(_, carry):
      residual, kept = carry
      total, x, z = call(residual, hidden, weight, projection)
      return total, kept + x[0, 0, 0].astype(jnp.float32) + z[-1, -1, -1].astype(jnp.float32)

    return jax.lax.fori_loop(0, _STEPS.value, step, (residual, jnp.float32(0)))

  return run


def _seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  rounds = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(10):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / (10 * _STEPS.value))
  return min(rounds)


def _worst(got, want) -> str:
  def diff(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

  scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for b in want[1:])
  projected = max(diff(a, b) for a, b in zip(got[1:], want[1:])) / scale
  return f"r' {diff(got[0], want[0]):.1e}, x|z {projected:.1e}"


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  separate, fused = jax.jit(_separate), jax.jit(_fused)
  cases = [tuple(map(int, c.split("x"))) for c in _CASE_LIST.value.split(",")] if _CASE_LIST.value else _CASES
  settings = json.loads(_ONLY.value) if _ONLY.value else _SETTINGS
  for batch, length in cases:
    args = _inputs(batch, length)
    case = f"{batch}x{length}"
    want = separate(*args)
    print(f"{case} add_norm, then in_proj's matmuls: {_seconds(_looped(_separate), *args) * 1e6:.1f} us", flush=True)
    for label in each_setting(add_norm, settings):
      try:
        worst = _worst(fused(*args), want)
        print(f"{case} fused {label}: {_seconds(_looped(_fused), *args) * 1e6:.1f} us; worst {worst}", flush=True)
      except Exception as error:  # noqa: BLE001 (settings past the registers or shared memory fail to compile)
        print(f"{case} fused {label}: failed ({str(error).splitlines()[0][:120]})", flush=True)


if __name__ == "__main__":
  app.run(main)
