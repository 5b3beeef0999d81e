r"""A block's add + norm with a projection as one kernel (inference) against the two launches it replaces, at Vim-Ti
shapes (bf16), over the kernel's launch settings; checked against the two launches on the card. --kernel picks:
- `add_norm_project`: the add + norm and the next in_proj (`add_norm.add_norm`, then `layers.matmul_halves`);
- `projected_add_norm`: the last out_proj and the add + norm (`layers.dense`, then `add_norm.add_norm`).

  PYTHONPATH=. python experiments/benchmarks/add_norm_project_ab.py > add_norm_project_ab.txt

Each call runs inside a loop of --steps calls on the device, the stream carried from one to the next (as the blocks
carry it: r' written over r, no copy), the other outputs kept alive by one element each. Each line: microseconds per
call (the best of 3 rounds of 10 loops), and for the kernel the largest difference from the two launches' r'
(`add_norm_project`: expected 0; `projected_add_norm`: within a bf16 rounding of h) and its other outputs (relative
to their largest magnitude; the two round and sum in other orders).
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.kernel_settings import each_setting
from kernels import add_norm
from vim_jax.models import layers

_KERNEL = flags.DEFINE_enum("kernel", "add_norm_project", ["add_norm_project", "projected_add_norm"], "Which kernel.")
_STEPS = flags.DEFINE_integer("steps", 20, "Calls per loop on the device.")
_ONLY = flags.DEFINE_string("only", "", "JSON {setting: [values]} to sweep instead of _SETTINGS's (others as shipped).")
_CASE_LIST = flags.DEFINE_string("cases", "", "batch x length,... instead of _CASES (e.g. 32x4097,128x197).")
_CASES = ((32, 4097), (32, 6085), (128, 197))  # (batch, length): 1024² and 1248², batch 32; 224², batch 128
_SETTINGS = {  # every combination
  "add_norm_project": {
    "PROJECT_BLOCK_ELEMENTS": (64 * 192, 32 * 192, 128 * 192),
    "PROJECT_NUM_WARPS": (4, 8),
    "PROJECT_TILE": (128, 64),
  },
  "projected_add_norm": {
    "PROJECTED_BLOCK_ROWS": (64, 32),  # 128 rows spill (offline, sm_90)
    "PROJECTED_NUM_WARPS": (8, 4),
    "PROJECTED_K_TILE": (64, 32),
    "PROJECTED_NUM_STAGES": (2, 3),
  },
}
DIM, EPS = 192, 1e-6


def _inputs(batch: int, length: int):
  """(residual, the second input, the norm's weight, the projection): hidden and in_proj for `add_norm_project`,
  the mixer's output and out_proj for `projected_add_norm`."""
  keys = jax.random.split(jax.random.key(0), 4)
  residual = jax.random.normal(keys[0], (batch, length, DIM)) * 3
  weight = 1 + 0.1 * jax.random.normal(keys[2], (DIM,))
  if _KERNEL.value == "add_norm_project":
    hidden = jax.random.normal(keys[1], (batch, length, DIM), jnp.bfloat16)
    projection = (jax.random.normal(keys[3], (DIM, 4 * DIM)) * DIM**-0.5).astype(jnp.bfloat16)
    return residual, hidden, weight, projection
  mixed = jax.random.normal(keys[1], (batch, length, 2 * DIM), jnp.bfloat16)
  projection = (jax.random.normal(keys[3], (2 * DIM, DIM)) * (2 * DIM) ** -0.5).astype(jnp.bfloat16)
  return residual, mixed, weight, projection


def _separate(residual, other, weight, projection):
  if _KERNEL.value == "add_norm_project":
    return layers.add_norm_then_in_proj(residual, other, weight, projection, eps=EPS, precision=None, interpret=False)
  return layers.out_proj_then_add_norm(residual, other, projection, weight, eps=EPS, precision=None, interpret=False)


def _fused(residual, other, weight, projection):
  if _KERNEL.value == "add_norm_project":
    return add_norm.add_norm_project(residual, other, weight, projection, eps=EPS)
  return add_norm.projected_add_norm(residual, other, projection, weight, eps=EPS)


def _looped(call):
  """`--steps` calls in one device loop: each call's r' is the next one's residual."""

  @jax.jit
  def run(residual, other, weight, projection):
    def step(_, carry):
      residual, kept = carry
      total, *outputs = call(residual, other, weight, projection)
      return total, kept + sum(
        out[0, 0, 0].astype(jnp.float32) + out[-1, -1, -1].astype(jnp.float32) for out in outputs
      )

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
  return f"r' {diff(got[0], want[0]):.1e}, other outputs {projected:.1e}"


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  separate, fused = jax.jit(_separate), jax.jit(_fused)
  cases = [tuple(map(int, c.split("x"))) for c in _CASE_LIST.value.split(",")] if _CASE_LIST.value else _CASES
  settings = json.loads(_ONLY.value) if _ONLY.value else _SETTINGS[_KERNEL.value]
  for batch, length in cases:
    args = _inputs(batch, length)
    case = f"{batch}x{length}"
    want = separate(*args)
    print(f"{case} {_KERNEL.value}'s two launches: {_seconds(_looped(_separate), *args) * 1e6:.1f} us", flush=True)
    for label in each_setting(add_norm, settings):
      try:
        worst = _worst(fused(*args), want)
        print(f"{case} fused {label}: {_seconds(_looped(_fused), *args) * 1e6:.1f} us; worst {worst}", flush=True)
      except Exception as error:  # noqa: BLE001 (settings past the registers or shared memory fail to compile)
        print(f"{case} fused {label}: failed ({str(error).splitlines()[0][:120]})", flush=True)


if __name__ == "__main__":
  app.run(main)
