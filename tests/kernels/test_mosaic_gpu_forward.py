"""The Mosaic GPU forward that experiments/benchmarks/scan_mosaic_gpu.py times against the Triton kernels:
its math in Mosaic GPU's interpret mode (loads straight from HBM: interpret mode cannot run the pipeline's
predicated copies), and the lowering for CUDA, where Mosaic GPU checks its layout rules, of the variant
that stages blocks through shared memory, at Vim-Ti's shapes in bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from forward_inputs import forward_inputs

from experiments.benchmarks import scan_mosaic_gpu
from kernels import selective_scan


def test_forward_matches_reference_in_interpret_mode():
  args = forward_inputs(2, 11, 64, jnp.float32)
  y = scan_mosaic_gpu.forward(*args, interpret=scan_mosaic_gpu.plgpu.InterpretGPUParams())
  expected = selective_scan(*args, delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_d, block_t, unroll", [(128, 16, 1), (64, 32, 4)])
def test_forward_lowers_for_cuda_at_vim_tiny_shapes(block_d, block_t, unroll):
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((128, 197, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  forward = functools.partial(scan_mosaic_gpu.forward, block_d=block_d, block_t=block_t, unroll=unroll)
  text = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
