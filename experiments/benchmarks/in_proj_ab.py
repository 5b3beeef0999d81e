r"""in_proj as Vim ships it (`layers.matmul_halves`: x and z each by its own matmul, each read of the normed tokens
its own) against one matmul writing (batch, length, 2 · d_inner), at Vim-Ti shapes, bf16: what reading the tokens
once would save if the conv and scan kernels read x and z as column windows of that one output.

  PYTHONPATH=. python experiments/benchmarks/in_proj_ab.py > in_proj_ab.txt

Each line: microseconds per call, the best of 3 rounds of --calls calls queued back to back (`scan_common.time_call`;
each call's kernels take 50 µs or more, so the launches hide behind them), and the bytes' rate against the HBM traffic
of the call.
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import time_call
from vim_jax.models import layers

_CALLS = flags.DEFINE_integer("calls", 50, "Calls per round.")
_CASES = ((32, 6085), (32, 4097), (128, 197))  # (batch, length): 1248² and 1024², batch 32; 224², batch 128
DIM, INNER = 192, 384


def _seconds(fn, *args) -> float:
  return min(time_call(lambda _: fn(*args), lambda seed: None, _CALLS.value) for _ in range(3))


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  halves = jax.jit(lambda x, w: layers.matmul_halves(x, w, None))
  whole = jax.jit(lambda x, w: jnp.dot(x, w))
  for batch, length in _CASES:
    keys = jax.random.split(jax.random.key(0))
    hidden = jax.random.normal(keys[0], (batch, length, DIM), jnp.bfloat16)
    weight = (jax.random.normal(keys[1], (DIM, 2 * INNER)) * DIM**-0.5).astype(jnp.bfloat16)
    rows, item = batch * length, 2
    for name, fn, read_times in (("two matmuls (shipped)", halves, 2), ("one matmul", whole, 1)):
      seconds = _seconds(fn, hidden, weight)
      traffic = rows * (DIM * read_times + 2 * INNER) * item
      print(f"{batch}x{length} {name}: {seconds * 1e6:.1f} us, {traffic / seconds / 1e12:.2f} TB/s", flush=True)


if __name__ == "__main__":
  app.run(main)
