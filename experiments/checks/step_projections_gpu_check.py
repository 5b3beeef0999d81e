r"""The compiled step-projections kernel against XLA's matmuls on the GPU itself (tests only run interpret mode).

  python experiments/checks/step_projections_gpu_check.py

Both directions' projected and delta, and the gradients of u and of the packed weights (`layers.step_projections`,
whose backward is XLA's), against autodiff of `step_projections.reference`, at Vim-Ti's widths,
with rows that no block divides, fewer rows than a block, and float16. Prints the worst relative error per
case and exits non-zero above the tolerance.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app

from experiments.checks.gpu_check import Tally
from kernels import step_projections
from vim_jax.models import layers

# (batch, length, channels, rank, state, dtype): Vim-Ti at 224² batch 128 and at 1248², 256 channels, float16,
# fewer rows than a block. Wider models (Vim-S, -B) run XLA's matmuls (`step_projections.supported`).
CASES = [
  (128, 197, 384, 16, 16, jnp.bfloat16),
  (2, 6085, 384, 16, 16, jnp.bfloat16),
  (3, 197, 256, 16, 16, jnp.bfloat16),
  (1, 197, 384, 16, 16, jnp.float16),
  (1, 7, 384, 16, 16, jnp.bfloat16),
]
TOLERANCE = (
  2e-2  # two bf16 steps of the largest value; the matmuls accumulate in float32 in a different order than XLA's
)


def _inputs(key, batch, length, channels, rank, state, dtype):
  keys = jax.random.split(key, 3)
  us = tuple(jax.random.normal(k, (batch, length, channels), dtype) for k in jax.random.split(keys[0]))
  packed = (jax.random.normal(keys[1], (2, channels, rank + 2 * state + rank)) * channels**-0.5).astype(dtype)
  return us, packed


def _run(fn, us, packed):
  def loss(us, packed):
    outputs = fn(*us, packed)
    weights = jax.tree.map(lambda y: jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape)), outputs)
    return sum(
      jnp.sum(y.astype(jnp.float32) * w) for y, w in zip(jax.tree.leaves(outputs), jax.tree.leaves(weights))
    ), outputs

  (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(us, packed)
  return outputs, grads


def main(argv) -> int:
  del argv
  tally = Tally()
  for i, (batch, length, channels, rank, state, dtype) in enumerate(CASES):
    us, packed = _inputs(jax.random.key(i), batch, length, channels, rank, state, dtype)

    def kernel(u_f, u_b, packed, rank=rank):
      return layers.step_projections(u_f, u_b, packed, rank, False)

    def xla(u_f, u_b, packed, rank=rank):
      return tuple(step_projections.reference(u, w, rank) for u, w in zip((u_f, u_b), packed))

    errors, worst = tally.compare(_run(kernel, us, packed), _run(xla, us, packed), TOLERANCE)
    outputs, (d_us, d_packed) = errors
    print(
      f"b{batch} l{length} d{channels} rank {rank} {jnp.dtype(dtype).name}: worst relative error {worst:.2e}; "
      f"outputs {max(jax.tree.leaves(outputs)):.1e}, du {max(d_us):.1e}, d(packed) {d_packed:.1e}"
    )
  return tally.verdict()


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
