"""The positions-parallel forward that experiments/benchmarks/scan_positions_parallel.py times against the
shipped kernels: its math in interpret mode (float64, lengths that are and are not whole blocks, a sequence of
one block) and its lowering for CUDA at Vim-Ti's shapes in bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from forward_inputs import forward_inputs

from experiments.benchmarks import scan_positions_parallel as positions
from kernels import selective_scan


def test_linear_recurrence_is_the_sequential_recurrence(x64):
  a, b = (jax.random.uniform(key, (13, 3), jnp.float64) for key in jax.random.split(jax.random.key(1)))
  cumulative, states = positions.linear_recurrence(a, b)
  h, want = jnp.zeros(3, jnp.float64), []
  for t in range(13):
    h = a[t] * h + b[t]
    want.append(h)
  np.testing.assert_allclose(states, jnp.stack(want), rtol=1e-13)
  np.testing.assert_allclose(cumulative, jnp.cumprod(a, axis=0), rtol=1e-13)


@pytest.mark.parametrize("length, block_t", [(37, 8), (32, 8), (8, 8), (50, 16)])
def test_forward_matches_reference_in_float64(length, block_t, x64):
  """37: a last block that starts early and skips what was done; 32: whole blocks; 8: one block."""
  args = forward_inputs(2, length, 32, jnp.float64, seed=length)
  forward = functools.partial(positions.forward, block_t=block_t, block_d=16, interpret=True)
  y = jax.jit(forward)(*args)
  expected = selective_scan(*args, delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-11, atol=1e-11)


def test_bad_shapes_are_named():
  args = forward_inputs(1, 4, 24, jnp.float32)
  with pytest.raises(ValueError, match=r"channels \(24\) must be a multiple of block_d \(16\) and length \(4\)"):
    positions.forward(*args, block_t=8, block_d=16, interpret=True)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("block_t, block_d, num_warps", [(16, 16, 4), (32, 32, 8)])
def test_forward_lowers_for_cuda_at_vim_tiny_shapes(block_t, block_d, num_warps):
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  forward = functools.partial(positions.forward, block_t=block_t, block_d=block_d, num_warps=num_warps)
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    text = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "selective_scan_positions_parallel" in text
