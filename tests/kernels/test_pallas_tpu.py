"""Tests for kernels.selective_scan.pallas_tpu: forward and VJP against the sequential reference, residuals,
and the Mosaic TPU lowering at Vim's shapes.

The kernels run on CPU in interpret mode (float32 in TPU interpret mode, which simulates VMEM and the
grid; float64 in the generic interpreter), which checks their logic and block indexing on tiny shapes.
Lowering for TPU checks what interpret mode does not (Mosaic's block-shape rules) at real shapes, without
a TPU. Neither runs the Mosaic compiler itself."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.selective_scan import pallas_tpu, reference


def random_inputs(rng, batch, length, channels, state):
  """(u, delta, A, B, C) in the ranges of the official test data (delta > 0, A < 0: a stable scan)."""
  seq = (batch, length, channels)
  return (
    rng.normal(size=seq),
    rng.uniform(0.02, 0.5, seq),
    -np.exp(np.log(np.arange(1, state + 1)) + 0.3 * rng.normal(size=(channels, state))),
    rng.normal(size=(batch, length, state)),
    rng.normal(size=(batch, length, state)),
  )


def forward_and_vjp(scan, arrays, cotangents):
  """(y, h_last) and the VJP of all five arrays, jitted."""

  def run(arrays, cotangents):
    out, vjp = jax.vjp(scan, *arrays)
    return out, vjp(cotangents)

  return jax.jit(run)(arrays, cotangents)


def check_against_reference(shape, reverse, dtype, tol, **options):
  """The kernel in `dtype` against the reference in float64, forward and VJP, to rtol = atol = tol."""
  rng = np.random.default_rng(sum(shape) + reverse)
  batch, _, channels, state = shape
  arrays = random_inputs(rng, *shape)
  cotangents = (rng.normal(size=arrays[0].shape), rng.normal(size=(batch, channels, state)))
  with jax.enable_x64(True):
    kernel = functools.partial(pallas_tpu.scan, reverse=reverse, interpret=True, **options)
    cast = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, dtype))
    actual = forward_and_vjp(kernel, cast(arrays), cast(cotangents))
    cast = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float64))
    expected = forward_and_vjp(functools.partial(reference.scan, reverse=reverse), cast(arrays), cast(cotangents))
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, jax.tree.map(lambda x: x.astype(dtype), expected))
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


# (batch, length, channels, state) with chunks of 16 and channel blocks of 128: length 1 and 7 fit one
# (padded) chunk, 37 takes three with 11 padding positions; 3 channels pad to one block, 130 to two; state
# 4 pads to 8. In float64 the kernel body matches the reference to rounding.
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (2, 7, 3, 16), (2, 37, 130, 4)])
def test_matches_reference_in_float64(shape, reverse):
  check_against_reference(shape, reverse, jnp.float64, 1e-12, max_chunk=16, max_block_d=128)


@pytest.mark.parametrize("reverse", [False, True])
def test_float32_matches_float64_reference(reverse):
  """What runs on TPU: float32, here with the default 384-lane limit (130 channels: one block of 256)."""
  check_against_reference((2, 37, 130, 16), reverse, jnp.float32, 1e-5, max_chunk=16)


def test_default_blocks_at_vim_tiny_width():
  """The defaults at Vim-tiny's width and token count: one 384-lane block, 197 positions in 2 x 104."""
  check_against_reference((1, 197, 384, 16), True, jnp.float32, 1e-5)


def vim_inputs(batch, length, channels=384, state=16):
  shapes = [(batch, length, channels)] * 2 + [(channels, state)] + [(batch, length, state)] * 2
  return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def test_residuals_are_the_inputs_and_chunk_start_states():
  """No (batch, length, channels, state) tensor is kept: only the inputs and one state per chunk of
  128 positions (6085 -> 48 chunks)."""
  arrays = vim_inputs(8, 6085)
  scan = functools.partial(pallas_tpu.scan, reverse=True)
  residuals = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(scan, *a)[1]), *arrays)
  assert [(r.shape, r.dtype) for r in residuals] == [
    *((a.shape, a.dtype) for a in arrays),
    ((8, 48, 16, 384), jnp.float32),
  ]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch", "length", "padded_length"), [(128, 197, 208), (8, 6085, 6144)])
def test_lowers_for_tpu_at_vim_shapes(batch, length, padded_length, reverse):
  """Both kernels lower to Mosaic for TPU on this CPU host at Vim-tiny's width (384 channels: one
  block), with the length padded to equal chunks of at most 128 (197 -> 2 x 104, 6085 -> 48 x 128)."""

  def forward_and_backward(*arrays):
    out, vjp = jax.vjp(functools.partial(pallas_tpu.scan, reverse=reverse), *arrays)
    return vjp(out)

  hlo = jax.jit(forward_and_backward).trace(*vim_inputs(batch, length)).lower(lowering_platforms=("tpu",)).as_text()
  calls = [line for line in hlo.splitlines() if "custom_call @tpu_custom_call" in line]
  assert sorted(re.search(r'kernel_name = "(\w+)"', call)[1] for call in calls) == [
    "selective_scan_bwd",
    "selective_scan_fwd",
  ]
  assert all(f"tensor<{batch}x{padded_length}x384xf32>" in call for call in calls)
