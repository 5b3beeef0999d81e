r"""The compiled block-end kernel (out_proj, residual add, RMSNorm) against XLA on the GPU itself (tests only run
interpret mode).

  python experiments/checks/residual_norm_gpu_check.py

The new residual and its norm, and the gradients of y, out_proj's kernel, the residual and the norm's weight
(`layers.project_add_norm`, whose backward is XLA's), against autodiff of `residual_norm.reference`, at Vim-Ti's
and Vim-S's widths, with rows that no block divides, fewer rows than a block, a drop-path scale, float16 and a
float32 output. Prints the worst relative error per case and exits non-zero above the tolerance.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app

from experiments.checks.gpu_check import Tally
from kernels import residual_norm
from vim_jax.models import layers

# (batch, length, channels, dim, scaled, dtype, out_dtype): Vim-Ti at 224², batch 128 and at 1248²; drop path;
# Vim-S; float16; fewer rows than a block; the last block's float32 output.
CASES = [
  (128, 197, 384, 192, False, jnp.bfloat16, jnp.bfloat16),
  (2, 6085, 384, 192, True, jnp.bfloat16, jnp.bfloat16),
  (3, 197, 768, 384, False, jnp.bfloat16, jnp.bfloat16),
  (1, 197, 384, 192, True, jnp.float16, jnp.float16),
  (1, 7, 384, 192, False, jnp.bfloat16, jnp.float32),
]
TOLERANCE = 2e-2  # two bf16 steps of the largest value: the matmul accumulates in a different order than XLA's
EPS = 1e-5


def _inputs(key, batch, length, channels, dim, scaled, dtype):
  keys = jax.random.split(key, 5)
  y = jax.random.normal(keys[0], (batch, length, channels), dtype)
  kernel = (jax.random.normal(keys[1], (channels, dim)) * channels**-0.5).astype(dtype)
  residual = jax.random.normal(keys[2], (batch, length, dim), jnp.float32)
  norm_weight = 1 + 0.2 * jax.random.normal(keys[3], (dim,))
  row_scale = jnp.where(jax.random.bernoulli(keys[4], 0.7, (batch, length)), 1 / 0.7, 0.0) if scaled else None
  return (y, kernel, residual, norm_weight), row_scale


def _run(fn, args):
  def loss(args):
    outputs = fn(*args)
    weights = [jnp.cos(jnp.arange(a.size, dtype=jnp.float32).reshape(a.shape)) for a in outputs]
    return sum(jnp.sum(a.astype(jnp.float32) * w) for a, w in zip(outputs, weights)), outputs

  (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
  return outputs, grads


def main(argv) -> int:
  del argv
  tally = Tally()
  for i, (batch, length, channels, dim, scaled, dtype, out_dtype) in enumerate(CASES):
    args, row_scale = _inputs(jax.random.key(i), batch, length, channels, dim, scaled, dtype)

    def kernel(*args, row_scale=row_scale, out_dtype=out_dtype):
      return layers.project_add_norm(*args, row_scale, EPS, out_dtype, False)

    def xla(*args, row_scale=row_scale, out_dtype=out_dtype):
      return residual_norm.reference(*args, row_scale, eps=EPS, out_dtype=out_dtype)

    (outputs, grads), worst = tally.compare(_run(kernel, args), _run(xla, args), TOLERANCE)
    print(
      f"b{batch} l{length} e{channels} d{dim} {'scaled ' if scaled else ''}{jnp.dtype(dtype).name} -> "
      f"{jnp.dtype(out_dtype).name}: worst relative error {worst:.2e}; outputs {max(outputs):.1e}, "
      f"grads (y, kernel, residual, norm weight) {', '.join(f'{g:.1e}' for g in grads)}"
    )
  return tally.verdict()


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
