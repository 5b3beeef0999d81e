"""The step-projections kernel (interpret mode) against XLA's matmuls, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import step_projections
from vim_jax.models import layers


def _inputs(rng, batch, length, channels, width, rank, dtype=jnp.bfloat16):
  us = tuple(jnp.asarray(rng.standard_normal((batch, length, channels)), dtype) for _ in range(2))
  packed = jnp.asarray(rng.standard_normal((2, channels, width + rank)) * channels**-0.5, dtype)
  return us, packed


def _reference(u_f, u_b, packed, rank):
  return tuple(step_projections.reference(u, w, rank) for u, w in zip((u_f, u_b), packed))


@pytest.mark.parametrize(
  "batch, length, channels, width, rank, programs",
  [(2, 37, 64, 48, 16, 66), (1, 5, 32, 48, 16, 66), (3, 20, 96, 64, 32, 1), (1, 70, 48, 64, 48, 2)],
)
def test_kernel_equals_xla_matmuls(batch, length, channels, width, rank, programs, monkeypatch):
  """Rows that no block divides (74, 60, 70: the last block overlaps), fewer rows than a block (5: padded),
  channel blocks of 64, 32 and 16, Vim-Ti/-S/-B's ranks as packed (16, 32, 48), programs that walk several
  blocks of 32 rows (one program for 2 blocks, two for 3)."""
  monkeypatch.setattr(step_projections, "PROGRAMS", programs)
  jax.clear_caches()  # the kernel is jitted: traced again with these programs
  rng = np.random.default_rng(length)
  us, packed = _inputs(rng, batch, length, channels, width, rank)
  got = jax.jit(step_projections.project, static_argnames=("rank", "interpret"))(*us, packed, rank=rank, interpret=True)
  want = _reference(*us, packed, rank)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)


def test_gradients_equal_autodiff_of_the_xla_matmuls():
  """`layers.step_projections` (the kernel forward, a hand-written backward) against autodiff of XLA's matmuls."""
  rng = np.random.default_rng(0)
  rank = 16
  us, packed = _inputs(rng, 2, 19, 64, 48, rank)
  want_out, want_vjp = jax.vjp(lambda *a: _reference(*a, rank), *us, packed)
  got_out, got_vjp = jax.vjp(lambda *a: layers.step_projections(*a, rank, True), *us, packed)
  cotangents = jax.tree.map(lambda y: jnp.asarray(rng.standard_normal(y.shape), y.dtype), want_out)
  for a, b in zip(jax.tree.leaves((got_out, got_vjp(cotangents))), jax.tree.leaves((want_out, want_vjp(cotangents)))):
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = float(np.max(np.abs(np.asarray(b, np.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-2 * scale)


def test_shapes_and_dtypes_the_kernel_refuses():
  assert step_projections.supported(384, 48, 16, jnp.bfloat16)
  assert not step_projections.supported(384, 48, 16, jnp.float32)  # tensor cores: 2-byte floats only
  assert not step_projections.supported(384, 44, 12, jnp.bfloat16)  # the rank must be padded to whole pieces
  assert not step_projections.supported(100, 48, 16, jnp.bfloat16)
  assert not step_projections.supported(768, 64, 32, jnp.bfloat16)  # Vim-S: its weights overflow shared memory
  us, packed = _inputs(np.random.default_rng(0), 1, 4, 32, 48, 16)
  with pytest.raises(ValueError, match="`packed` must be"):
    step_projections.project(*us, packed[:1], rank=16, interpret=True)
  with pytest.raises(ValueError, match="unsupported shapes"):
    step_projections.project(*(u.astype(jnp.float32) for u in us), packed.astype(jnp.float32), rank=16)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernel_runs_per_device_under_a_mesh(axis_type):
  """Under a mesh the kernel runs per device, the batch split over all 8 devices; the weights' gradient is the
  sum over every sample."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind, kind))
  rank = 16
  us, packed = _inputs(np.random.default_rng(3), 8, 9, 32, 48, rank)

  def loss(u_f, u_b, packed, projections):
    (p_f, d_f), (p_b, d_b) = projections(u_f, u_b, packed)
    return sum(jnp.sum(jnp.sin(a.astype(jnp.float32))) for a in (p_f, d_f, p_b, d_b))

  def kernel(u_f, u_b, packed):
    return layers.step_projections(u_f, u_b, packed, rank, True)

  def xla(u_f, u_b, packed):
    return _reference(u_f, u_b, packed, rank)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  expected = grad(*us, packed, xla)
  with jax.set_mesh(mesh):
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = grad(*(jax.device_put(u, batch) for u in us), packed, kernel)
    assert "shard_map" in str(jax.make_jaxpr(loss, static_argnums=3)(*us, packed, kernel))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    scale = float(np.max(np.abs(np.asarray(b, np.float32))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=2e-2 * scale)
