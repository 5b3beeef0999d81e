"""Zero padding to kernel block sizes, shared by the Pallas kernels."""

import jax
import jax.numpy as jnp


def pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` along `axis` up to `size`; a no-op (no copy) when it is already that size."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)
