"""torch's softplus (threshold 20) and its derivative, and SiLU's derivative: shared by the XLA path and the kernels."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# torch.nn.functional.softplus switches to the identity above this input (official kernels too).
THRESHOLD = 20.0


def softplus(
  x: jax.Array,
  exp: Callable[[jax.Array], jax.Array] = jnp.exp,
  log1p: Callable[[jax.Array], jax.Array] = jnp.log1p,
) -> jax.Array:
  """log1p(exp(x)), or x above the threshold. The exp branch gets 0 where it is unused, so neither it
  nor its gradient overflows for large inputs (a `minimum` clamp would halve the gradient at 20).
  `exp` and `log1p` may be the kernels' faster ones (`ptx`)."""
  above = x > THRESHOLD
  return jnp.where(above, x, log1p(exp(jnp.where(above, 0.0, x))))


def softplus_grad(x: jax.Array, sigmoid: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid) -> jax.Array:
  """d softplus / dx: sigmoid(x), or 1 above the threshold."""
  return jnp.where(x > THRESHOLD, 1.0, sigmoid(x))


def silu_grad(x: jax.Array, sigmoid: Callable[[jax.Array], jax.Array] = jax.nn.sigmoid) -> jax.Array:
  """d silu / dx = sigmoid(x) (1 + x (1 - sigmoid(x)))."""
  s = sigmoid(x)
  return s * (1 + x * (1 - s))
