"""Gradients for forward-only scan kernels: recompute through `xla.scan` in the backward pass.

A kernel that only runs the forward recurrence gets correct gradients for all five arrays this way,
keeping nothing but its inputs as residuals, until it has a backward kernel of its own.
"""

import functools
from collections.abc import Callable

import jax

from kernels.selective_scan import xla

ScanFn = Callable[..., tuple[jax.Array, jax.Array]]


def with_xla_backward(forward: ScanFn) -> ScanFn:
  """Wraps `forward` (the `reference.scan` contract plus keyword options) in a `jax.custom_vjp`
  whose backward pass is the VJP of `xla.scan` on the saved inputs."""

  @functools.wraps(forward)
  def scan(
    u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, reverse: bool, **options
  ) -> tuple[jax.Array, jax.Array]:
    # Defined per call so `reverse` and the options are closed over, not traced.
    @jax.custom_vjp
    def run(*arrays):
      return forward(*arrays, reverse=reverse, **options)

    def run_fwd(*arrays):
      return run(*arrays), arrays

    def run_bwd(arrays, cotangents):
      _, vjp = jax.vjp(functools.partial(xla.scan, reverse=reverse), *arrays)
      return vjp(cotangents)

    run.defvjp(run_fwd, run_bwd)
    return run(u, delta, A, B, C)

  return scan
