r"""The compiled conv + SiLU kernels against the XLA path on the GPU itself (tests only run interpret mode).

  python experiments/checks/conv_silu_gpu_check.py
  export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      XLA_FLAGS=--xla_gpu_enable_command_buffer=
  python experiments/checks/conv_silu_gpu_check.py          # compiles into the cache
  compute-sanitizer --tool memcheck python experiments/checks/conv_silu_gpu_check.py

Both directions' outputs and the gradients of x and of both kernels and biases, on shapes that exercise
a short last block of positions, sequences shorter than the conv window, channels off the 128-block and
bf16 I/O. Prints the worst relative error per case and exits non-zero above the tolerance. The sanitizer
run loads the executables the plain run left in the persistent cache, as `scan_gpu_check.py` explains.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app

from experiments.checks.gpu_check import Tally
from kernels.conv_silu import conv_silu_bidirectional

# (batch, length, channels, taps, dtype)
CASES = [
  (2, 2, 3, 4, jnp.float32),
  (2, 197, 200, 4, jnp.float32),
  (1, 300, 384, 4, jnp.bfloat16),
  (3, 777, 64, 3, jnp.float32),
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def _inputs(key, batch, length, channels, taps, dtype):
  keys = jax.random.split(key, 7)
  x = jax.random.normal(keys[0], (batch, length, channels), dtype)
  weights = tuple(
    (jax.random.normal(k_w, (taps, channels)) / taps, 0.1 * jax.random.normal(k_b, (channels,)))
    for k_w, k_b in ((keys[1], keys[2]), (keys[3], keys[4]))
  )
  cotangents = tuple(jax.random.normal(k, (batch, length, channels), dtype) for k in keys[5:])
  return x, weights, cotangents


def _run(impl, x, weights, cotangents):
  def loss(x, weights):
    outputs = conv_silu_bidirectional(x, *weights, impl=impl)
    return sum(jnp.sum(y.astype(jnp.float32) * c) for y, c in zip(outputs, cotangents)), outputs

  (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, weights)
  return outputs, grads


def main(argv) -> int:
  del argv
  tally = Tally()
  for i, (batch, length, channels, taps, dtype) in enumerate(CASES):
    x, weights, cotangents = _inputs(jax.random.key(i), batch, length, channels, taps, dtype)
    errors, worst = tally.compare(
      _run("pallas_gpu", x, weights, cotangents), _run("xla", x, weights, cotangents), TOLERANCE[dtype]
    )
    outputs, (dx, dweights) = errors
    print(
      f"b{batch} l{length} d{channels} k{taps} {jnp.dtype(dtype).name}: worst relative error {worst:.2e}; "
      f"outputs {max(outputs):.1e}, dx {dx:.1e}, d(kernels, biases) {max(jax.tree.leaves(dweights)):.1e}"
    )
  return tally.verdict()


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
