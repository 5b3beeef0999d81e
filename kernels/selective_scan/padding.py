"""What the kernels share about their arguments: zero padding to block sizes, the compute dtype, and plain arrays
in place of the lazy `Columns` and `NegativeExp` arguments."""

import jax
import jax.numpy as jnp

from kernels.selective_scan.columns import Columns
from kernels.selective_scan.negative_exp import NegativeExp


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


def plain(args: tuple, *, windows: bool = True) -> tuple:
  """`args` with `Columns` windows sliced (unless not `windows`: for a kernel that reads them in place) and a
  `NegativeExp` computed, for code that takes plain arrays."""
  kinds = Columns | NegativeExp if windows else NegativeExp
  return tuple(x.value() if isinstance(x, kinds) else x for x in args)
