"""The block-end kernel (out_proj, residual add, RMSNorm; interpret mode) against XLA, forward and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import residual_norm
from vim_jax.models import layers

EPS = 1e-5


def _inputs(rng, batch, length, channels, dim, *, scaled: bool, dtype=jnp.bfloat16):
  y = jnp.asarray(rng.standard_normal((batch, length, channels)), dtype)
  kernel = jnp.asarray(rng.standard_normal((channels, dim)) * channels**-0.5, dtype)
  residual = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)
  norm_weight = jnp.asarray(1 + 0.2 * rng.standard_normal(dim), jnp.float32)
  row_scale = jnp.asarray(rng.choice([0.0, 2.0], (batch, length)), jnp.float32) if scaled else None
  return y, kernel, residual, norm_weight, row_scale


def _assert_close(got, want, tolerance):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = float(np.max(np.abs(np.asarray(b, np.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize(
  "batch, length, channels, dim, scaled, out_dtype, programs",
  [
    (2, 37, 384, 192, False, jnp.bfloat16, 1),  # Vim-Ti's widths: pieces of 64, contraction blocks of 128; one
    # program walks both blocks of rows
    (3, 5, 32, 48, True, jnp.bfloat16, 132),  # fewer rows than a block (15: padded), pieces of 16, blocks of 32
    (1, 70, 96, 384, True, jnp.float32, 132),  # rows no block divides (the last overlaps), Vim-S's width, f32 out
  ],
)
def test_kernel_equals_xla(batch, length, channels, dim, scaled, out_dtype, programs, monkeypatch):
  """The new residual and its norm equal XLA's (`reference`) to bf16 rounding of the matmul's output."""
  monkeypatch.setattr(residual_norm, "PROGRAMS", programs)
  args = _inputs(np.random.default_rng(length), batch, length, channels, dim, scaled=scaled)
  options = dict(eps=EPS, out_dtype=out_dtype)
  got = jax.jit(functools.partial(residual_norm.project_add_norm, interpret=True, **options))(*args)
  want = residual_norm.reference(*args, **options)
  _assert_close(got, want, 1e-2)
  if scaled:  # dropped rows keep the residual exactly
    dropped = np.asarray(args[4]) == 0
    np.testing.assert_array_equal(np.asarray(got[0])[dropped], np.asarray(args[2])[dropped])


@pytest.mark.parametrize("scaled", [False, True])
def test_gradients_equal_autodiff_of_xla(scaled):
  """`layers.project_add_norm` (the kernel, a hand-written backward) against autodiff of `reference`: the
  gradients of y, the kernel, the residual and the norm's weight (drop path's scale is a constant)."""
  rng = np.random.default_rng(1)
  y, kernel, residual, norm_weight, row_scale = _inputs(rng, 2, 19, 64, 48, scaled=scaled)

  def fused(y, kernel, residual, norm_weight):
    return layers.project_add_norm(y, kernel, residual, norm_weight, row_scale, EPS, jnp.bfloat16, True)

  def xla(y, kernel, residual, norm_weight):
    return residual_norm.reference(y, kernel, residual, norm_weight, row_scale, eps=EPS, out_dtype=jnp.bfloat16)

  args = (y, kernel, residual, norm_weight)
  want_out, want_vjp = jax.vjp(xla, *args)
  got_out, got_vjp = jax.vjp(fused, *args)
  cotangents = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), want_out)
  _assert_close((got_out, got_vjp(cotangents)), (want_out, want_vjp(cotangents)), 2e-2)


def test_shapes_and_dtypes_the_kernel_refuses():
  assert residual_norm.supported(384, 192, jnp.bfloat16)
  assert not residual_norm.supported(384, 192, jnp.float32)  # tensor cores: 2-byte floats only
  assert not residual_norm.supported(1536, 768, jnp.bfloat16)  # Vim-B: its sums overflow the registers
  assert not residual_norm.supported(100, 48, jnp.bfloat16)
  y, kernel, residual, norm_weight, _ = _inputs(np.random.default_rng(0), 1, 4, 32, 48, scaled=False)
  with pytest.raises(ValueError, match=r"`residual` must be \(1, 4, 48\) float32"):
    residual_norm.project_add_norm(y, kernel, residual.astype(jnp.bfloat16), norm_weight, eps=EPS)
  with pytest.raises(ValueError, match=r"`row_scale` must be \(1, 4\)"):
    residual_norm.project_add_norm(y, kernel, residual, norm_weight, jnp.ones(4), eps=EPS)
  with pytest.raises(ValueError, match="unsupported shapes"):
    residual_norm.project_add_norm(y.astype(jnp.float32), kernel.astype(jnp.float32), residual, norm_weight, eps=EPS)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernel_runs_per_device_under_a_mesh(axis_type):
  """Under a mesh the kernel runs per device, the batch split over all 8 devices; the weights' gradients are sums
  over every sample."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind, kind))
  y, kernel, residual, norm_weight, row_scale = _inputs(np.random.default_rng(3), 8, 9, 32, 48, scaled=True)

  def loss(y, kernel, residual, norm_weight, fused: bool):
    if fused:
      out = layers.project_add_norm(y, kernel, residual, norm_weight, row_scale, EPS, jnp.bfloat16, True)
    else:
      out = residual_norm.reference(y, kernel, residual, norm_weight, row_scale, eps=EPS, out_dtype=jnp.bfloat16)
    return sum(jnp.sum(jnp.sin(a.astype(jnp.float32))) for a in out)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  expected = grad(y, kernel, residual, norm_weight, False)
  with jax.set_mesh(mesh):
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    y, residual, row_scale = (jax.device_put(a, batch) for a in (y, residual, row_scale))
    got = grad(y, kernel, residual, norm_weight, True)
    assert "shard_map" in str(jax.make_jaxpr(loss, static_argnums=4)(y, kernel, residual, norm_weight, True))
  _assert_close(got, expected, 2e-2)
