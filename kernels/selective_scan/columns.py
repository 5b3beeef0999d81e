"""A window of an array's last axis, passed unsliced: B and C read straight from x_proj's output, x and z from
in_proj's.

Mamba's x_proj writes the step, B and C side by side in one (batch, length, rank + 2 state) array, and in_proj x and
z in one (batch, length, 2 d_inner). Sliced in XLA, each window is one more kernel and one more round trip through
memory before the kernel that reads it (a Pallas call takes dense operands, so XLA cannot fuse the slice into it).
Passed as `Columns`, the GPU kernels read the window in place through their block index; the other impls slice it
(`value`).
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Columns:
  """`array[..., start:start + size]`, not yet sliced."""

  array: jax.Array
  start: int = dataclasses.field(metadata=dict(static=True))
  size: int = dataclasses.field(metadata=dict(static=True))

  def __post_init__(self):
    width = self.array.shape[-1] if hasattr(self.array, "shape") else None
    if width is not None and not 0 <= self.start <= self.start + self.size <= width:
      raise ValueError(
        f"Columns: start={self.start}, size={self.size} must lie within the array's last axis of {width}"
      )

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.array.shape[:-1], self.size)

  @property
  def dtype(self):
    return self.array.dtype

  def value(self) -> jax.Array:
    """The window as an array of its own (a slice)."""
    return jax.lax.slice_in_dim(self.array, self.start, self.start + self.size, axis=-1)

  def block(self, size: int) -> int | None:
    """The window's index as the `size`-wide block of the last axis that it is, or None if it is not one."""
    return self.first_block(size) if self.size == size else None

  def first_block(self, size: int) -> int | None:
    """The index of the window's first `size`-wide block of the last axis, or None if the window is not whole such
    blocks (a kernel reading blocks of `size` channels then reads it in place)."""
    return self.start // size if self.start % size == 0 and self.size % size == 0 else None

  def cotangent(self, window_cotangent: jax.Array) -> "Columns":
    """The cotangent of the whole array (zero outside the window) from the window's."""
    width = self.array.shape[-1]
    pad = [(0, 0)] * (self.array.ndim - 1) + [(self.start, width - self.start - self.size)]
    return Columns(jnp.pad(window_cotangent.astype(self.array.dtype), pad), self.start, self.size)
