"""The Mosaic GPU gradient kernel (`kernels.selective_scan.mosaic_gpu_backward`): every gradient against the float64
reference in interpret mode (blocks read from HBM in place), each direction, a last block past the sequence's end,
softplus above its threshold; its lowering for CUDA at Vim-Ti's shapes in bf16, staged through shared memory; its
argument checks; where `pallas_gpu` calls it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from forward_inputs import forward_inputs

from kernels import Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import mosaic_gpu, mosaic_gpu_backward, pallas_gpu
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.mosaic_gpu_backward import gradients

INTERPRET = mosaic_gpu_backward.plgpu.InterpretGPUParams()


def _inputs(length: int):
  """(u, delta, A, B, C, D, delta_bias, dy) in float32, two channel blocks; a few step sizes above softplus's
  threshold."""
  u, delta, A, B, C, D, _, bias = forward_inputs(2, length, 64, jnp.float32, seed=3)
  delta = delta.at[:, ::5, ::7].set(25.0)
  dy = jax.random.normal(jax.random.key(4), u.shape, jnp.float32)
  return u, delta, A, B, C, D, bias, dy


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
  "length, block_t, options",
  [
    (13, 4, dict(shared_steps=True)),
    (16, 8, dict(shared_steps=False)),
    (13, 4, dict(keep_steps=False)),
    (13, 8, dict(shared_bc=True)),
  ],
  ids=["past-the-end", "whole-blocks", "steps-read-again", "shared-bc"],
)
def test_gradients_match_reference_in_float64_in_interpret_mode(length, block_t, options, reverse, x64):
  *args, dy = _inputs(length)

  def scan(u, delta, A, B, C, D, bias):
    return selective_scan(u, delta, A, B, C, D, None, bias, delta_softplus=True, reverse=reverse, impl="reference")

  _, vjp = jax.vjp(scan, *(x.astype(jnp.float64) for x in args))
  expected = vjp(dy.astype(jnp.float64))
  got = gradients(*args, dy, reverse=reverse, block_t=block_t, staged=False, interpret=INTERPRET, **options)
  for name, g, e in zip(mosaic_gpu_backward.Gradients._fields, got, expected, strict=True):
    assert g.shape == e.shape and g.dtype == jnp.float32, name
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-5 * float(jnp.max(jnp.abs(e))), err_msg=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
  "batch, length, block_t, options",
  [
    (128, 197, 8, {}),
    (8, 6085, 16, {}),
    (128, 197, 8, dict(shared_bc=True, keep_steps=False)),
  ],
  ids=["224", "1248", "224-options"],
)
def test_gradients_lower_for_cuda_at_vim_tiny_shapes(batch, length, block_t, options, reverse):
  seq, states = (jax.ShapeDtypeStruct((batch, length, n), jnp.bfloat16) for n in (384, 16))
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  args = (seq, seq, f32((384, 16)), states, states, f32((384,)), f32((384,)), seq)
  fn = functools.partial(gradients, block_t=block_t, reverse=reverse, **options)
  assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(channels=48), r"channels \(u.shape\[-1\] = 48\) must be a multiple of 32"),
    (dict(state=8), r"A must have shape \(channels, 16\)"),
    (dict(block_t=0), "block_t must be a positive multiple of 4, got 0"),
    (dict(block_t=6), "block_t must be a positive multiple of 4, got 6"),
    (dict(block_t=4, shared_bc=True), "block_t must be a multiple of 8 with shared_bc, got 4"),
    (dict(channel_sums="shared"), r"channel_sums must be one of \('shuffles', 'pallas'\), got 'shared'"),
  ],
)
def test_gradients_name_a_bad_argument(change, message):
  channels, state = change.get("channels", 32), change.get("state", 16)
  u = jnp.zeros((1, 4, channels))
  B = jnp.zeros((1, 4, 16))
  args = (u, u, jnp.zeros((channels, state)), B, B, jnp.zeros(channels), jnp.zeros(channels), u)
  with pytest.raises(ValueError, match=message):
    options = {k: v for k, v in change.items() if k not in ("channels", "state")}
    gradients(*args, **(dict(block_t=8) | options), interpret=INTERPRET)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mosaic_backward", [False, True])
def test_pallas_gpu_takes_vims_gradients_with_it_where_told(monkeypatch, mosaic_backward):
  """With `pallas_gpu.MOSAIC_BACKWARD`, the fused bidirectional call's backward on Hopper (an abstract H100) at 224²,
  batch 128 is a launch of this kernel per direction, B and C given as windows of x_proj's output; Triton's kernels
  (the forward's) otherwise."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  monkeypatch.setattr(mosaic_gpu, "compute_capability", lambda: "9.0")
  monkeypatch.setattr(pallas_gpu, "MOSAIC_BACKWARD", mosaic_backward)
  seq = jax.ShapeDtypeStruct((128, 197, 384), jnp.bfloat16)
  f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
  projected = jax.ShapeDtypeStruct((128, 197, 48), jnp.bfloat16)
  direction = Direction(seq, seq, f32((384, 16)), Columns(projected, 16, 16), Columns(projected, 32, 16))
  direction = direction._replace(D=f32((384,)), delta_bias=f32((384,)))

  def loss(forward, backward, z):
    y = selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl="pallas_gpu")
    return jnp.sum(y.astype(jnp.float32))

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = fn.trace(direction, direction, seq).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("mosaic_gpu_v2") == (2 if mosaic_backward else 0)
