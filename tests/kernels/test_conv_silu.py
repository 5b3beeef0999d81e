"""The fused conv + SiLU kernels (interpret mode) against the XLA conv, forward and gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compiled as fast_compiled

from kernels import Columns, conv_silu


def _inputs(rng, batch, length, channels, taps, dtype):
  x = jnp.asarray(rng.standard_normal((batch, length, channels)), dtype)
  weights = [
    (
      jnp.asarray(rng.standard_normal((taps, channels)) / taps, dtype),
      jnp.asarray(rng.standard_normal(channels), dtype),
    )
    for _ in range(2)
  ]
  return x, *weights


def _run(impl, x, forward, backward, cotangents):
  consumers = len(cotangents) // 2
  fn = functools.partial(conv_silu.conv_silu_bidirectional, impl=impl, interpret=True, consumers=consumers)
  out, vjp = jax.vjp(fn, x, forward, backward)
  return out, vjp(cotangents)


@pytest.mark.parametrize(
  "batch, length, channels, taps, consumers",
  [(2, 37, 5, 4, 1), (1, 3, 130, 4, 1), (2, 70, 16, 3, 1), (1, 33, 8, 1, 1), (2, 37, 5, 4, 2), (1, 20, 16, 4, 3)],
)
def test_kernels_match_xla_in_float64(batch, length, channels, taps, consumers, x64):
  """Several position blocks with a short last one (37, 70), a sequence shorter than the window (3),
  channels padded to the block (5, 130), odd and trivial kernel widths (3, 1); the pair returned for 2 and 3
  consumers, each with its own cotangents, which the backward kernel adds (XLA's autodiff adds them before)."""
  rng = np.random.default_rng(length)
  x, forward, backward = _inputs(rng, batch, length, channels, taps, jnp.float64)
  cotangents = tuple(jnp.asarray(rng.standard_normal(x.shape)) for _ in range(2 * consumers))
  args = (x, forward, backward, cotangents)
  out, grads = fast_compiled(functools.partial(_run, "pallas_gpu"), *args)(*args)
  expected_out, expected_grads = fast_compiled(functools.partial(_run, "xla"), *args)(*args)
  for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((expected_out, expected_grads))):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("start, size, width", [(128, 128, 384), (64, 64, 192), (3, 5, 11)])
def test_a_window_of_x_equals_its_slice(start, size, width, x64):
  """x as a `Columns` window of a wider array (in_proj's output, x and z side by side): read in place where it is
  whole blocks of the kernels' channels (128 of 384 from 128; 64 of 192, blocks of 64), sliced otherwise (5 of 11
  from 3); the outputs and the wide array's gradient (zero outside the window) are the slice's."""
  rng = np.random.default_rng(start)
  wide, forward, backward = _inputs(rng, 2, 37, width, 4, jnp.float64)
  forward, backward = _inputs(rng, 1, 1, size, 4, jnp.float64)[1:]
  cotangents = tuple(jnp.asarray(rng.standard_normal((2, 37, size))) for _ in range(2))

  def run(window):
    fn = functools.partial(conv_silu.conv_silu_bidirectional, impl="pallas_gpu", interpret=True)
    out, vjp = jax.vjp(lambda wide: fn(window(wide), forward, backward), wide)
    return out, vjp(cotangents)

  got = jax.jit(functools.partial(run, lambda wide: Columns(wide, start, size)))
  want = jax.jit(functools.partial(run, lambda wide: wide[..., start : start + size]))
  for a, b in zip(jax.tree.leaves(got()), jax.tree.leaves(want()), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_kernels_keep_bfloat16_inputs_and_float32_weights():
  rng = np.random.default_rng(0)
  x, forward, backward = _inputs(rng, 2, 19, 8, 4, jnp.float32)
  x = x.astype(jnp.bfloat16)
  cotangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16) for _ in range(2))
  args = (x, forward, backward, cotangents)
  out, grads = fast_compiled(functools.partial(_run, "pallas_gpu"), *args)(*args)
  expected_out, expected_grads = fast_compiled(functools.partial(_run, "xla"), *args)(*args)
  assert [a.dtype for a in jax.tree.leaves((out, grads))] == [
    a.dtype for a in jax.tree.leaves((expected_out, expected_grads))
  ]
  for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((expected_out, expected_grads))):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


def test_bad_arguments_name_what_was_expected():
  x = jnp.zeros((2, 5, 8))
  good = (jnp.zeros((4, 8)), jnp.zeros(8))
  with pytest.raises(ValueError, match="`consumers` must be at least 1, got 0"):
    conv_silu.conv_silu_bidirectional(x, good, good, consumers=0)
  with pytest.raises(ValueError, match=r"`backward` must be \(kernel \(K, 8\), bias \(8,\)\)"):
    conv_silu.conv_silu_bidirectional(x, good, (jnp.zeros((4, 7)), jnp.zeros(8)))
  with pytest.raises(ValueError, match="unknown impl 'cuda'"):
    conv_silu.conv_silu_bidirectional(x, good, good, impl="cuda")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_kernels_lower_for_cuda_at_vim_tiny_shapes():
  """Forward and backward lowered for an H100 on any host (interpret mode never runs this path): two
  kernels, reading the bf16 x itself (no float32 copy of it)."""
  x = jax.ShapeDtypeStruct((128, 197, 384), jnp.bfloat16)
  weights = (jax.ShapeDtypeStruct((4, 384), jnp.float32), jax.ShapeDtypeStruct((384,), jnp.float32))

  def fwd_bwd(x, forward, backward):
    u, vjp = jax.vjp(conv_silu.fused, x, forward, backward)
    return vjp(u)

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fwd_bwd).trace(x, weights, weights).lower(lowering_platforms=("cuda",)).as_text()
  assert set(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*name = \"(\w+)\"", hlo)) == {
    "conv_silu_fwd",
    "conv_silu_bwd",
  }
  assert "tensor<128x197x384xf32>" not in hlo
  # SiLU and the taps' multiply-adds as single PTX instructions (kernels.selective_scan.ptx).
  assert all(op in hlo for op in ("ex2.approx.ftz.f32", "rcp.approx.ftz.f32", "fma.rn.f32"))
  assert "__nv_exp" not in hlo


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_kernels_read_a_window_of_in_projs_output_in_place():
  """x as the first half of Vim-Ti's in_proj output, lowered for an H100: both kernels read the (batch, length, 768)
  array itself, and nothing slices it."""
  xz = jax.ShapeDtypeStruct((128, 197, 768), jnp.bfloat16)
  weights = (jax.ShapeDtypeStruct((4, 384), jnp.float32), jax.ShapeDtypeStruct((384,), jnp.float32))

  def fwd_bwd(xz, forward, backward):
    u, vjp = jax.vjp(lambda xz: conv_silu.fused(Columns(xz, 0, 384), forward, backward), xz)
    return vjp(u)

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fwd_bwd).trace(xz, weights, weights).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in hlo.splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]
  assert sorted(re.search(r'name = "(\w+)"', call)[1] for call in calls) == ["conv_silu_bwd", "conv_silu_fwd"]
  # Each call's operand types: x's comes first.
  assert all(call.rsplit(" : (", 1)[1].startswith("tensor<128x197x768xbf16>") for call in calls)
  assert "stablehlo.slice" not in hlo


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernels_run_per_device_under_a_mesh(axis_type):
  """Under a mesh the kernels run per device, the batch split over all 8 devices; the weights' gradients
  are the sums of the per-device parts."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
  x, forward, backward = _inputs(np.random.default_rng(3), 8, 21, 8, 4, jnp.float32)

  def loss(x, forward, backward, impl):
    u_f, u_b = conv_silu.conv_silu_bidirectional(x, forward, backward, impl=impl, interpret=True)
    return jnp.sum(jnp.sin(u_f) * u_b)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  expected = grad(x, forward, backward, "xla")
  with jax.set_mesh(mesh):
    got = grad(x, forward, backward, "pallas_gpu")
    assert "shard_map" in str(jax.make_jaxpr(loss, static_argnums=3)(x, forward, backward, "pallas_gpu"))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
