"""delta = dt_proj(x_proj's step columns), passed unprojected: the GPU forward makes the step sizes itself.

In Mamba, dt_proj lifts x_proj's low-rank step (rank columns, 16 for Vim-Ti) to one step size per channel. Written
out, delta is a (batch, length, channels) array that crosses memory twice per direction (at 1248², batch 32, 150 MB
each way), where its inputs are 16 columns of x_proj's output and a (channels, rank) weight. Passed as
`ProjectedDelta`, `mosaic_gpu`'s forward multiplies them itself, per block on the tensor cores; the other impls
and every gradient path project it in XLA (`value`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from kernels.selective_scan.columns import Columns


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProjectedDelta:
  """`steps @ weight.T` in steps' dtype (float32 sums, as a bf16 matmul's; float64 ones for float64), not yet
  computed.

  steps: (batch, length, rank), or a `Columns` window of x_proj's output (read in place where it is a block).
  weight: (channels, rank), dt_proj's weight as PyTorch holds it (`nnx.Linear`'s kernel transposed).
  """

  steps: jax.Array | Columns
  weight: jax.Array

  def __post_init__(self):
    shapes = [getattr(x, "shape", None) for x in (self.steps, self.weight)]
    if None not in shapes and (len(shapes[1]) != 2 or shapes[0][-1] != shapes[1][1]):
      raise ValueError(
        f"ProjectedDelta: `weight` must be (channels, rank) with the rank of `steps` {shapes[0]}, got {shapes[1]}"
      )

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.steps.shape[:-1], self.weight.shape[0])

  @property
  def dtype(self):
    return self.steps.dtype

  @property
  def rank(self) -> int:
    return self.weight.shape[1]

  def _steps(self) -> jax.Array:
    return self.steps.value() if isinstance(self.steps, Columns) else self.steps

  def _sums(self):
    """The matmuls' accumulation dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(self.dtype, jnp.float32)

  def value(self) -> jax.Array:
    """delta as an array of its own (a matmul)."""
    weight = self.weight.astype(self.dtype)
    return jnp.dot(self._steps(), weight.T, preferred_element_type=self._sums()).astype(self.dtype)

  def cotangent(self, delta_cotangent: jax.Array) -> "ProjectedDelta":
    """The cotangents of `steps` (of the whole array, for a window) and `weight` from delta's."""
    d_delta = delta_cotangent.astype(self.dtype)
    d_steps = jnp.dot(d_delta, self.weight.astype(self.dtype), preferred_element_type=self._sums())
    rows = tuple(range(d_delta.ndim - 1))
    d_weight = jax.lax.dot_general(
      d_delta, self._steps(), ((rows, rows), ((), ())), preferred_element_type=self._sums()
    )
    if isinstance(self.steps, Columns):
      d_steps = self.steps.cotangent(d_steps)
    else:
      d_steps = d_steps.astype(self.steps.dtype)
    return ProjectedDelta(d_steps, d_weight.astype(self.weight.dtype))
