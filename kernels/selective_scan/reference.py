"""Sequential selective scan with `lax.scan`: the ground truth the other impls are tested against.

Simple rather than fast: one step per position, and under autodiff `lax.scan` keeps every step's
state, i.e. (batch, length, channels, state) residuals. Use `xla` for real work.
"""

import jax
import jax.numpy as jnp


def scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  *,
  reverse: bool,
  h0: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Runs h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; returns (y, h_last), y_t = <h_t, C_t>.

  Inputs are already in the compute dtype and `delta` is the final step size (bias and softplus
  applied by the caller). `reverse` runs from the last position to the first; `h0`, the state before
  the first position walked, is zero unless given.
  """

  def step(h, xs):
    u_t, delta_t, B_t, C_t = xs  # (batch, channels) x2, (batch, state) x2
    h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
    # Multiply-and-sum rather than einsum: a dot may run at reduced precision on TPU/GPU.
    return h, jnp.sum(h * C_t[:, None, :], axis=-1)

  time_major = tuple(jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C))
  h_last, y = jax.lax.scan(step, zero_state(u, A) if h0 is None else h0, time_major, reverse=reverse)
  return jnp.swapaxes(y, 0, 1), h_last


def zero_state(u: jax.Array, A: jax.Array) -> jax.Array:
  """The state before the first position, (batch, channels, state) zeros in u's dtype: under explicit mesh axes split
  over the batch as u is, since a scan's carry keeps the type the body gives it."""
  h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype)
  sharding = jax.typeof(u).sharding
  return h0 if sharding.mesh.empty else jax.sharding.reshard(h0, jax.sharding.PartitionSpec(sharding.spec[0]))
