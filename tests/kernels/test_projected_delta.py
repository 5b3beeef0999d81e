"""delta as a `ProjectedDelta` (x_proj's step columns and dt_proj's weight): its value and gradients in every impl,
the Mosaic GPU forward that projects it itself (interpret mode, and lowered for CUDA at Vim-Ti's shapes), and where
`pallas_gpu` lets that forward take it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from forward_inputs import forward_inputs
from test_mosaic_gpu_forward import _innermost_loops, _kernel_modules

from kernels import Direction, ProjectedDelta, projects_delta, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import mosaic_gpu
from kernels.selective_scan.columns import Columns

RANK = 16


def _projected(direction: Direction, seed: int) -> Direction:
  """`direction` with B and C windows of one [step | B | C] array, as x_proj writes it, and delta a `ProjectedDelta`
  of its step columns."""
  keys = jax.random.split(jax.random.key(seed), 2)
  batch, length, channels = direction.u.shape
  dtype = direction.u.dtype
  steps = jax.random.normal(keys[0], (batch, length, RANK), jnp.float32).astype(dtype)
  weight = (0.25 * jax.random.normal(keys[1], (channels, RANK), jnp.float32)).astype(dtype)
  array = jnp.concatenate([steps, direction.B, direction.C], axis=-1)
  return direction._replace(
    delta=ProjectedDelta(Columns(array, 0, RANK), weight), B=Columns(array, RANK, 16), C=Columns(array, RANK + 16, 16)
  )


def _pair(batch: int, length: int, channels: int, dtype) -> tuple[tuple[Direction, Direction], jax.Array]:
  """Two directions with projected deltas, and the gate z."""
  args = [forward_inputs(batch, length, channels, dtype, seed=seed) for seed in (0, 1)]
  return tuple(_projected(Direction(*a[:6], a[7]), seed) for seed, a in enumerate(args)), args[0][6]


def _valued(direction: Direction) -> Direction:
  return direction._replace(delta=direction.delta.value())


def test_value_is_the_matmul_and_shape_dtype_name_it():
  (direction, _), _ = _pair(2, 5, 32, jnp.bfloat16)
  delta = direction.delta
  want = jnp.einsum("blr,cr->blc", delta.steps.value().astype(jnp.float32), delta.weight.astype(jnp.float32))
  assert delta.shape == (2, 5, 32) and delta.dtype == jnp.bfloat16 and delta.rank == RANK
  np.testing.assert_allclose(np.asarray(delta.value(), np.float32), want, rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="weight"):
    ProjectedDelta(delta.steps, delta.weight[:, :8])


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu"])
def test_gradients_equal_those_of_delta_as_an_array(impl):
  """float64: a `ProjectedDelta`'s cotangent (of x_proj's whole output and of the weight) is autodiff's of the
  matmul; `pallas_gpu` (interpret mode) projects it in XLA and runs its Triton kernels."""
  with jax.enable_x64(True):
    (direction, _), z = _pair(2, 37, 32, jnp.float64)
    array, weight = direction.B.array, direction.delta.weight

    def loss(array, weight, lazy):
      delta = ProjectedDelta(Columns(array, 0, RANK), weight)
      delta = delta if lazy else delta.value()
      args = direction._replace(delta=delta, B=Columns(array, RANK, 16), C=Columns(array, RANK + 16, 16))
      y = selective_scan(*args[:6], z, args.delta_bias, delta_softplus=True, impl=impl, interpret=True)
      return jnp.sum(jnp.sin(y))

    grad = jax.grad(loss, argnums=(0, 1))
    for got, want in zip(grad(array, weight, True), grad(array, weight, False), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunks", [1, 3])
def test_mosaic_forward_projects_it_as_xla_does_in_interpret_mode(chunks):
  """Both directions in place (the first y over its u, as there is no delta to write over), in 3 chunks too, with a
  last block of 22 positions: the outputs of the same call given delta's value."""
  pair, z = _pair(2, 3 * 64 + 22, 64, jnp.bfloat16)
  options = dict(mosaic_gpu.OPTIONS, staged=False, chunks=chunks, interpret=mosaic_gpu.plgpu.InterpretGPUParams())
  lazy = mosaic_gpu.bidirectional(*pair, z, **options)
  valued = mosaic_gpu.bidirectional(*map(_valued, pair), z, **options)
  scale = float(jnp.max(jnp.abs(valued.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(lazy, np.float32), np.asarray(valued, np.float32), atol=1e-2 * scale)


@pytest.mark.parametrize("reverse", [False, True])
def test_mosaic_forward_of_one_direction_keeps_its_last_state_in_interpret_mode(reverse):
  """One gated direction in 3 chunks with its last state, as `pallas_gpu.scan` runs it, against the reference."""
  (direction, _), z = _pair(1, 2 * 64 + 40, 32, jnp.bfloat16)
  options = dict(mosaic_gpu.SINGLE_OPTIONS, staged=False, chunks=3, reverse=reverse, last_state=True)
  y, last = mosaic_gpu.forward(
    *direction[:6], z, direction.delta_bias, **options, interpret=mosaic_gpu.plgpu.InterpretGPUParams()
  )
  want_y, want_last = selective_scan(
    *direction[:6], z, direction.delta_bias, delta_softplus=True, reverse=reverse, return_last_state=True
  )
  for got, want in ((y, want_y), (last, want_last)):
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2 * scale)


@pytest.mark.parametrize("batch, launches", [(32, 2), (8, 4)])
def test_mosaic_forward_lowers_for_cuda_at_vim_tiny_1248_shapes(batch, launches):
  """At 1248², whole sequences (batch 32) or in chunks (batch 8): no slice and no matmul in XLA (the steps and B
  and C read where x_proj wrote them), both launches of y in place, and a WGMMA in every kernel's module."""
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((batch, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  array = jax.ShapeDtypeStruct((batch, 6085, RANK + 32), jnp.bfloat16)
  delta = ProjectedDelta(Columns(array, 0, RANK), jax.ShapeDtypeStruct((384, RANK), jnp.bfloat16))
  direction = Direction(shapes[0], delta, shapes[2], Columns(array, RANK, 16), Columns(array, RANK + 16, 16),
                        shapes[5], shapes[7])  # fmt: skip
  chunks = mosaic_gpu.chunks_to_fill(batch, 384)
  bidirectional = functools.partial(mosaic_gpu.bidirectional, chunks=chunks, **mosaic_gpu.OPTIONS)
  lowered = jax.jit(bidirectional).trace(direction, direction, shapes[6]).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("mosaic_gpu_v2") == launches
  assert text.count("output_operand_alias<") == 2
  assert "stablehlo.slice" not in text and "stablehlo.dot" not in text
  modules = _kernel_modules(lowered)
  assert len(modules) == launches
  for module in modules:
    with module.context:
      assert "wgmma.mma_async" in str(module)
  if launches == 2:  # the position loops of y's launches (the chunks' end states keep Pallas's barriers)
    for module in modules:
      with module.context:
        (loop,) = [loop for loop in _innermost_loops(module.operation) if "ex2.approx" in str(loop)]
        assert "bar.sync" not in str(loop)


@pytest.mark.parametrize("options", [dict(share_channel_work=False, state_pairs=False, epilogue=False,
                                          scatter_sums=False), dict(block_t=32)])  # fmt: skip
def test_mosaic_forward_refuses_it_without_shared_work_or_whole_wgmma_blocks(options):
  (direction, _), z = _pair(1, 64, 32, jnp.bfloat16)
  with pytest.raises(ValueError, match="ProjectedDelta"):
    mosaic_gpu.forward(*direction[:6], z, direction.delta_bias, **mosaic_gpu.SINGLE_OPTIONS | options)


@pytest.mark.parametrize("differentiated", [False, True])
def test_pallas_gpu_hands_it_to_the_one_pass_forward_where_it_fits(monkeypatch, differentiated):
  """On Hopper (an abstract H100) at 1248², batch 32, `projects_delta` says yes, and Vim's fused call gives the
  projected delta to the Mosaic forward (no matmul in XLA) where nothing is differentiated; with gradients XLA
  projects it for Triton's kernels."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  monkeypatch.setattr(mosaic_gpu, "compute_capability", lambda: "9.0")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert projects_delta(6085, 384, 16, jnp.bfloat16, impl=None)
  assert not projects_delta(197, 384, 16, jnp.bfloat16, impl=None)
  assert not projects_delta(6085, 384, 16, jnp.bfloat16, impl="xla")
  monkeypatch.undo()
  monkeypatch.setattr(mosaic_gpu, "compute_capability", lambda: "9.0")
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  array = jax.ShapeDtypeStruct((32, 6085, RANK + 32), jnp.bfloat16)
  delta = ProjectedDelta(Columns(array, 0, RANK), jax.ShapeDtypeStruct((384, RANK), jnp.bfloat16))
  direction = Direction(shapes[0], delta, shapes[2], Columns(array, RANK, 16), Columns(array, RANK + 16, 16),
                        shapes[5], shapes[7])  # fmt: skip

  def call(forward, backward, z):
    return selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl="pallas_gpu")

  fn = (lambda *args: jax.grad(lambda *a: jnp.sum(call(*a)), argnums=2)(*args)) if differentiated else call
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fn).trace(direction, direction, shapes[6]).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("mosaic_gpu_v2") == (0 if differentiated else 2)
  assert ("stablehlo.dot" in hlo) == differentiated
