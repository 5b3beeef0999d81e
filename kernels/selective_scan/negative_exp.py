"""A = -exp(A_log), passed uncomputed: the GPU kernels exponentiate Mamba's A_log parameter themselves.

Mamba keeps A as its log, and A = -exp(A_log) is a (channels, state) array per direction and layer. In XLA that
is one more small kernel before every scan (48 launches in a Vim-Ti forward), where the GPU kernels can compute
it from the block of A_log that they load anyway. Passed as `NegativeExp`, the GPU kernel does; the other impls
compute it (`value`). Vim-Ti on an H200 (ab_negative_exp_vim_tiny_h200.json, bf16): the forward at 224², batch
128 went from 8.10 to 7.98 ms (rounds 7.98-8.13 against 7.95-7.99) and at 1248², batch 32 from 73.9 to 73.0 ms;
the training step did not change (36.56 against 36.52 ms).
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NegativeExp:
  """`-exp(log)`, not yet computed."""

  log: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.log.shape

  @property
  def dtype(self):
    return self.log.dtype

  def value(self) -> jax.Array:
    return -jnp.exp(self.log)

  def cotangent(self, value_cotangent: jax.Array) -> "NegativeExp":
    """The cotangent of `log` from the value's: d(-exp(log)) = -exp(log) dlog."""
    return NegativeExp((value_cotangent * self.value()).astype(self.log.dtype))
