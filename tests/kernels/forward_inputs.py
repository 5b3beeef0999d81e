"""Random inputs of a gated selective-scan forward, shared by the experimental forwards' tests."""

import jax
import jax.numpy as jnp


def forward_inputs(batch: int, length: int, channels: int, dtype, seed: int = 0) -> tuple:
  """(u, delta, A, B, C, D, z, delta_bias), state 16: the sequences in `dtype`, A, D and the bias in float32 or
  wider (as the model passes them)."""
  keys = jax.random.split(jax.random.key(seed), 8)
  seq = lambda key: jax.random.normal(key, (batch, length, channels), jnp.float32).astype(dtype)  # noqa: E731
  state = lambda key: jax.random.normal(key, (batch, length, 16), jnp.float32).astype(dtype)  # noqa: E731
  wide = jnp.promote_types(dtype, jnp.float32)
  A = -jnp.exp(jax.random.normal(keys[5], (channels, 16), jnp.float32)).astype(wide)
  D = jax.random.normal(keys[6], (channels,), jnp.float32).astype(wide)
  bias = (0.1 * jax.random.normal(keys[7], (channels,), jnp.float32)).astype(wide)
  return seq(keys[0]), seq(keys[1]), A, state(keys[3]), state(keys[4]), D, seq(keys[2]), bias
