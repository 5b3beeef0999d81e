"""The residual add + RMSNorm kernel (interpret mode) against XLA, forward and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import add_norm

EPS = 1e-5


def _inputs(rng, shape, hidden_dtype=jnp.bfloat16):
  residual = jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32)
  hidden = jnp.asarray(rng.standard_normal(shape), hidden_dtype)
  weight = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), jnp.float32)
  return residual, hidden, weight


def _kernel(dtype):
  return jax.jit(lambda r, h, w: add_norm.add_norm(r, h, w, eps=EPS, dtype=dtype, interpret=True))


@pytest.mark.parametrize(
  "shape, hidden_dtype, dtype",
  [
    ((2, 37, 192), jnp.bfloat16, jnp.bfloat16),  # Vim-Ti's row (128 + 64); 74 rows: the last block masked
    ((1, 5, 48), jnp.float32, jnp.float32),  # fewer rows than a block; 32 + 16
    ((3, 32, 384), jnp.bfloat16, jnp.float32),  # whole blocks; Vim-S's row (256 + 128)
  ],
)
def test_kernel_equals_xla(shape, hidden_dtype, dtype):
  residual, hidden, weight = _inputs(np.random.default_rng(shape[1]), shape, hidden_dtype)
  total, normed = _kernel(dtype)(residual, hidden, weight)
  want_total, want_normed = add_norm.reference(residual, hidden, weight, EPS, dtype)
  assert total.dtype == jnp.float32 and normed.dtype == dtype and normed.shape == shape
  np.testing.assert_array_equal(total, want_total)  # the sum is one rounding either way
  # The mean of squares sums in another order than XLA's: within one rounding of the output.
  rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want_normed, np.float32), rtol=rtol)


@pytest.mark.parametrize(
  "shape, dtype",
  [
    ((2, 19, 48), jnp.float32),  # 38 rows: three blocks, the last masked; 32 + 16
    ((2, 37, 192), jnp.bfloat16),  # Vim-Ti's row, bf16 y as the model's: five blocks of the weight's partial sums
  ],
)
def test_gradients_equal_autodiff_of_xla(shape, dtype):
  """All three gradients (the backward kernel), with cotangents on both outputs (the next block's add and its
  mixer), against XLA's autodiff of `reference` in float64 on the same (rounded) inputs and cotangents."""
  rng = np.random.default_rng(0)
  args = _inputs(rng, shape)

  def xla(*args):
    return add_norm.reference(*args, EPS, jnp.float64)

  def kernel(*args):
    return add_norm.add_norm(*args, eps=EPS, dtype=dtype, interpret=True)

  got_out, got_vjp = jax.vjp(kernel, *args)
  cotangents = tuple(jnp.asarray(rng.standard_normal(y.shape), y.dtype) for y in got_out)
  with jax.enable_x64():
    wide = tuple(jnp.asarray(x, jnp.float64) for x in args)
    want_out, want_vjp = jax.vjp(xla, *wide)
    want = jax.tree.map(np.asarray, (want_out, want_vjp(tuple(jnp.asarray(c, jnp.float64) for c in cotangents))))
  for a, b in zip(jax.tree.leaves((got_out, got_vjp(cotangents))), jax.tree.leaves(want), strict=True):
    tolerance = 1e-2 if a.dtype == jnp.bfloat16 else 1e-5  # bf16 (y, d_hidden) rounds to 2^-8
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tolerance, atol=tolerance * np.max(np.abs(b)))


def test_pieces_are_powers_of_two_widest_first():
  assert add_norm._pieces(192) == [(0, 128), (128, 64)]
  assert add_norm._pieces(768) == [(0, 512), (512, 256)]
  assert add_norm._pieces(48) == [(0, 32), (32, 16)]


def test_bad_arguments_raise():
  residual, hidden, weight = _inputs(np.random.default_rng(1), (1, 4, 24))
  with pytest.raises(ValueError, match="`residual` must be float32"):
    add_norm.add_norm(residual.astype(jnp.bfloat16), hidden, weight, eps=EPS, dtype=jnp.float32)
  with pytest.raises(ValueError, match="`hidden` must have residual's shape"):
    add_norm.add_norm(residual, hidden[:, :2], weight, eps=EPS, dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"`weight` must be \(24,\)"):
    add_norm.add_norm(residual, hidden, weight[:8], eps=EPS, dtype=jnp.float32)
  with pytest.raises(ValueError, match="multiple of 16, got 24"):
    add_norm.add_norm(residual, hidden, weight, eps=EPS, dtype=jnp.float32, interpret=True)


_F32, _BF16 = jnp.float32, jnp.bfloat16


@pytest.mark.parametrize(
  "name, fn, shapes",
  [
    (
      "add_norm",
      lambda r, h, w: add_norm._fused(r, h, w, eps=EPS, dtype=_BF16, interpret=False),
      [((32, 6085, 192), _F32), ((32, 6085, 192), _BF16), ((192,), _F32)],
    ),
    (
      "add_norm_project",
      lambda r, h, w, p: add_norm.add_norm_project(r, h, w, p, eps=EPS),
      [((32, 6085, 192), _F32), ((32, 6085, 192), _BF16), ((192,), _F32), ((192, 768), _BF16)],
    ),
    (
      "projected_add_norm",
      lambda r, m, p, w: add_norm.projected_add_norm(r, m, p, w, eps=EPS),
      [((32, 4097, 192), _F32), ((32, 4097, 384), _BF16), ((384, 192), _BF16), ((192,), _F32)],
    ),
  ],
)
def test_kernels_lower_for_cuda_at_vim_tiny_shapes(name, fn, shapes):
  """One Triton kernel at 1248² or 1024², batch 32, r' written over the residual (aliased: no copy of the stream)."""
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*name = \"(\w+)\"", hlo) == [name]
  assert "output_operand_aliases" in hlo


def test_differentiated_kernel_writes_its_own_stream_buffer():
  """Differentiated, r' is not written over the residual: that residual is the previous block's r', kept for its
  backward, and XLA would copy it before the call. Two blocks' add + norm, lowered for CUDA with gradients: two
  forward kernels and two backward ones, none aliased."""
  args = (
    jax.ShapeDtypeStruct((32, 6085, 192), jnp.float32),
    jax.ShapeDtypeStruct((32, 6085, 192), jnp.bfloat16),
    jax.ShapeDtypeStruct((192,), jnp.float32),
  )

  def two_blocks(r, h, w):
    r, y = add_norm._fused(r, h, w, eps=EPS, dtype=jnp.bfloat16, interpret=False)
    r, y2 = add_norm._fused(r, y, w, eps=EPS, dtype=jnp.bfloat16, interpret=False)
    return jnp.sum(r) + jnp.sum(y2.astype(jnp.float32))

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  fn = jax.jit(jax.grad(two_blocks, argnums=(0, 1, 2)))
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  kernels = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*name = \"(\w+)\"", hlo)
  assert sorted(kernels) == ["add_norm", "add_norm", "add_norm_bwd", "add_norm_bwd"]
  assert "output_operand_aliases" not in hlo


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_kernel_runs_per_device_under_a_mesh(axis_type):
  """Under a mesh the kernel runs per device, the rows split over all 8 devices; the weight's gradient is the
  sum over every sample."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind, kind))
  args = _inputs(np.random.default_rng(3), (8, 9, 32))

  def kernel(residual, hidden, weight):
    return add_norm.add_norm(residual, hidden, weight, eps=EPS, dtype=jnp.float32, interpret=True)

  def xla(residual, hidden, weight):
    return add_norm.reference(residual, hidden, weight, EPS, jnp.float32)

  def loss(residual, hidden, weight, add_and_norm):
    total, normed = add_and_norm(residual, hidden, weight)
    return jnp.sum(jnp.sin(total)) + jnp.sum(jnp.cos(normed))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  expected = grad(*args, xla)
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = grad(*(jax.device_put(a, rows) for a in args[:2]), args[2], kernel)
    assert "shard_map" in str(jax.make_jaxpr(loss, static_argnums=3)(*args, kernel))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)


def _projection(rng, dim, width):
  return jnp.asarray(rng.standard_normal((dim, 2 * width)) / np.sqrt(dim), jnp.bfloat16)


@pytest.mark.parametrize(
  "shape, width",
  [
    ((2, 37, 192), 384),  # Vim-Ti: 74 rows, two blocks of 64, the last masked; 3 column tiles per half
    ((1, 5, 48), 32),  # fewer rows than a block; a tile of 32 columns
    ((2, 20, 384), 768),  # Vim-S: blocks of 32 rows, K pieces 256 + 128
    ((1, 16, 64), 96),  # a half's width not a power of two: tiles of 32
  ],
)
def test_add_norm_project_equals_add_norm_then_matmul(shape, width):
  """r' exactly, and each half of y · projection within a rounding of the output: y is `add_norm`'s in bf16 (the
  kernel's rstd sums in another order, so y may differ by one bf16 rounding, which the tolerance allows)."""
  rng = np.random.default_rng(shape[1])
  residual, hidden, weight = _inputs(rng, shape)
  projection = _projection(rng, shape[-1], width)
  total, first, second = jax.jit(lambda r, h, w, p: add_norm.add_norm_project(r, h, w, p, eps=EPS, interpret=True))(
    residual, hidden, weight, projection
  )
  want_total, normed = add_norm.reference(residual, hidden, weight, EPS, jnp.bfloat16)
  want = np.asarray(jnp.dot(normed, projection, preferred_element_type=jnp.float32))
  np.testing.assert_array_equal(total, want_total)
  assert first.shape == second.shape == (*shape[:-1], width) and first.dtype == jnp.bfloat16
  scale = np.max(np.abs(want))
  for got, half in ((first, want[..., :width]), (second, want[..., width:])):
    np.testing.assert_allclose(np.asarray(got, np.float32), half, rtol=1e-2, atol=1e-2 * scale)


def test_add_norm_project_bad_arguments_raise():
  rng = np.random.default_rng(2)
  residual, hidden, weight = _inputs(rng, (1, 4, 32))
  projection = _projection(rng, 32, 64)
  with pytest.raises(ValueError, match=r"`projection` must be \(32, 2 · width\), got \(16, 128\)"):
    add_norm.add_norm_project(residual, hidden, weight, projection[:16], eps=EPS)
  with pytest.raises(ValueError, match="dtype float32 is not supported"):
    add_norm.add_norm_project(residual, hidden, weight, projection.astype(jnp.float32), eps=EPS)
  with pytest.raises(ValueError, match=r"each half's width a multiple of 16"):
    add_norm.add_norm_project(residual, hidden, weight, projection[:, :24], eps=EPS)
  with pytest.raises(ValueError, match="add_norm_project: `hidden` must have residual's shape"):
    add_norm.add_norm_project(residual, hidden[:, :2], weight, projection, eps=EPS)


def _project_inputs(rng):
  residual, hidden, weight = _inputs(rng, (8, 9, 32))
  return residual, hidden, weight, _projection(rng, 32, 32)


@pytest.mark.parametrize(
  "project, inputs",
  [
    (lambda r, h, w, p: add_norm.add_norm_project(r, h, w, p, eps=EPS, interpret=True), _project_inputs),
    (lambda r, m, p, w: _projected(r, m, p, w), lambda rng: _projected_inputs(rng, (8, 9, 32), 64)),
  ],
  ids=["add_norm_project", "projected_add_norm"],
)
def test_projection_kernels_run_per_device_under_a_mesh(project, inputs):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  first, second, *whole = inputs(np.random.default_rng(4))
  project = jax.jit(project)
  expected = project(first, second, *whole)
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = project(jax.device_put(first, rows), jax.device_put(second, rows), *whole)
  assert got[1].sharding.spec[0] == ("data", "fsdp")
  for a, b in zip(got, expected, strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_add_norm_project_pays_up_to_the_measured_rows():
  assert add_norm.project_pays(128 * 197)  # 224², batch 128: faster on the card
  assert not add_norm.project_pays(32 * 4097)  # 1024², batch 32: as fast, more memory


def _projected_inputs(rng, shape, width):
  residual, _, weight = _inputs(rng, shape)
  mixed = jnp.asarray(rng.standard_normal((*shape[:-1], width)), jnp.bfloat16)
  projection = jnp.asarray(rng.standard_normal((width, shape[-1])) / np.sqrt(width), jnp.bfloat16)
  return residual, mixed, projection, weight


def _projected(r, m, p, w):
  return add_norm.projected_add_norm(r, m, p, w, eps=EPS, interpret=True)


@pytest.mark.parametrize(
  "shape, width",
  [
    ((2, 37, 192), 384),  # Vim-Ti: 74 rows, two blocks of 64, the last masked; 3 contraction steps; pieces 128 + 64
    ((1, 5, 48), 96),  # fewer rows than a block; steps of 32
    ((2, 40, 384), 768),  # Vim-S: 6 steps, pieces 256 + 128
  ],
)
def test_projected_add_norm_equals_matmul_then_add_norm(shape, width):
  """h = mixed · projection is rounded to bf16 as a bf16 matmul writes it, but its float32 sum runs in other order
  than XLA's: r' within one bf16 rounding of h, y within one of its own."""
  residual, mixed, projection, weight = _projected_inputs(np.random.default_rng(shape[1]), shape, width)
  total, normed = jax.jit(_projected)(residual, mixed, projection, weight)
  hidden = jnp.dot(mixed, projection, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  want_total, want_normed = add_norm.reference(residual, hidden, weight, EPS, jnp.bfloat16)
  assert total.shape == normed.shape == shape and normed.dtype == jnp.bfloat16
  rounding = np.abs(np.asarray(hidden, np.float32)) * 2**-7 + 1e-5  # a bf16 ulp
  assert np.all(np.abs(np.asarray(total) - np.asarray(want_total)) <= rounding)
  np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want_normed, np.float32), rtol=2e-2, atol=2e-2)


def test_projected_add_norm_bad_arguments_raise():
  residual, mixed, projection, weight = _projected_inputs(np.random.default_rng(5), (1, 4, 32), 64)
  with pytest.raises(ValueError, match=r"`projection` must be \(width, 32\), got \(64, 16\)"):
    add_norm.projected_add_norm(residual, mixed, projection[:, :16], weight, eps=EPS)
  with pytest.raises(ValueError, match=r"`mixed` must be \(1, 4, 64\) in bfloat16 .*got \(1, 4, 64\) in float32"):
    add_norm.projected_add_norm(residual, mixed.astype(jnp.float32), projection, weight, eps=EPS)
  with pytest.raises(ValueError, match="dtype float32 is not supported"):
    add_norm.projected_add_norm(residual, mixed.astype(jnp.float32), projection.astype(jnp.float32), weight, eps=EPS)
  with pytest.raises(ValueError, match=r"projected_add_norm: `weight` must be \(32,\)"):
    add_norm.projected_add_norm(residual, mixed, projection, weight[:8], eps=EPS)


def test_each_boundary_kernel_runs_where_it_was_measured_faster():
  for rows in (128 * 197, 32 * 4097, 32 * 6085):  # 224², batch 128; 1024² and 1248², batch 32
    assert add_norm.project_pays(rows) != add_norm.projected_pays(rows)
  assert add_norm.projected_pays(32 * 4097) and add_norm.project_pays(128 * 197)
