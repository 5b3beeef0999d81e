"""Zero padding to kernel block sizes and the compute dtype, shared by the Pallas kernels."""

import jax
import jax.numpy as jnp


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` along `axis` up to `size`; a no-op (no copy) when it is already that size."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def compute_dtype(*arrays) -> jnp.dtype:
  """float32, or wider if an input is (float64 in x64 tests); None entries (absent options) are skipped."""
  return jnp.dtype(jnp.result_type(jnp.float32, *(x for x in arrays if x is not None)))
