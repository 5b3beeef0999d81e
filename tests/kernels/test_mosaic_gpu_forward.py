"""The Mosaic GPU forward (`kernels.selective_scan.mosaic_gpu`) in every state layout, with and without shared
per-channel work (and float32 B and C rows), whole or in chunks, one direction and both, in place or not: its math in
Mosaic GPU's interpret mode (rows or blocks read from HBM in place: interpret mode cannot run the pipeline's
predicated copies), the lowering for CUDA, where Mosaic GPU checks its layout rules, of the variants that stage
blocks through shared memory, at Vim-Ti's shapes in bf16, the lowered loop over positions (no barrier, every load
before any store), and where `pallas_gpu` calls it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from forward_inputs import forward_inputs

from experiments.checks.mosaic_shared_memory import (
  kernel_modules,
  launch_shared_memory,
  programs_per_multiprocessor,
  vim_bidirectional_lowered,
)
from kernels import Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import mosaic_gpu
from kernels.selective_scan.columns import Columns


@pytest.mark.parametrize("layout", mosaic_gpu.LAYOUTS)
def test_forward_matches_reference_in_interpret_mode(layout):
  args = forward_inputs(2, 11, 128, jnp.float32)
  y = mosaic_gpu.forward(*args, block_d=128, layout=layout, interpret=mosaic_gpu.plgpu.InterpretGPUParams())
  expected = selective_scan(*args, delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "share_channel_work, f32_states, epilogue",
  [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
  ids=["per-thread", "shared", "f32", "epilogue"],
)
@pytest.mark.parametrize("layout, block_d", [("quarter_rows", 32), ("wgmma", 64)])
def test_blocked_forward_matches_reference_in_interpret_mode(layout, block_d, share_channel_work, f32_states, epilogue):
  """Blocks of 32 positions read from HBM in place (the staged copies do not run in interpret mode), two channel
  blocks; with shared work, B's and C's rows also in float32 in shared memory, and y finished after each block."""
  args = forward_inputs(2, 64, 2 * block_d, jnp.float32)
  y = mosaic_gpu.forward(
    *args,
    block_d=block_d,
    block_t=32,
    layout=layout,
    share_channel_work=share_channel_work,
    f32_states=f32_states,
    epilogue=epilogue,
    staged=False,
    interpret=mosaic_gpu.plgpu.InterpretGPUParams(),
  )
  expected = selective_scan(*args, delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "block_t, share_channel_work, in_place, epilogue",
  [
    (0, False, False, False),
    (32, False, True, False),
    (32, True, False, False),
    (32, True, True, False),
    (32, True, True, True),
  ],
)
def test_bidirectional_matches_reference_in_interpret_mode(block_t, share_channel_work, in_place, epilogue):
  """Vim's two directions and their combine: the backward direction walks blocks and positions last first; in
  place, each y over an input (its delta, then the first y); with `epilogue`, y finished after each block."""
  forward_args, backward_args = (forward_inputs(2, 64, 64, jnp.float32, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  z = forward_args[6]
  y = mosaic_gpu.bidirectional(
    *pair,
    z,
    block_d=32,
    block_t=block_t,
    layout="quarter_rows",
    share_channel_work=share_channel_work,
    f32_states=epilogue,
    epilogue=epilogue,
    in_place=in_place,
    staged=False,
    interpret=mosaic_gpu.plgpu.InterpretGPUParams(),
  )
  expected = selective_scan_bidirectional(*pair, z, delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "chunks, share_channel_work, reverse", [(2, False, False), (3, True, True), (5, True, False), (5, False, True)]
)
def test_chunked_forward_matches_reference_in_interpret_mode(chunks, share_channel_work, reverse):
  """Five blocks of 32 positions (the last of 22) in chunks of 3 + 2, 2 + 2 + 1 and 1 each: a launch for the chunks'
  end states, then one for y, each chunk from the state the chunks walked before it carry; unroll 4 walks each block
  in groups; with 5 chunks and shared work, y finished after each block (`epilogue`)."""
  args = forward_inputs(2, 4 * 32 + 22, 64, jnp.float32)
  options = dict(block_d=32, block_t=32, unroll=4, layout="quarter_rows", staged=False, reverse=reverse)
  y = mosaic_gpu.forward(
    *args,
    **options,
    share_channel_work=share_channel_work,
    f32_states=share_channel_work and chunks == 3,
    epilogue=share_channel_work and chunks == 5,
    chunks=chunks,
    interpret=mosaic_gpu.plgpu.InterpretGPUParams(),
  )
  expected = selective_scan(*args, delta_softplus=True, reverse=reverse, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "chunks, reverse, gated", [(1, False, True), (1, True, False), (3, True, True), (3, False, False)]
)
def test_forward_returns_the_last_state_in_interpret_mode(chunks, reverse, gated):
  """`last_state`: the state after the last position walked, from the program whose chunk is walked last. The last
  block holds 8 positions of 32: the 24 zeros past them, as TMA reads them, must leave the state as it is. In 3
  chunks, y is finished after each block (`epilogue`)."""
  args = forward_inputs(2, 4 * 32 + 8, 64, jnp.float32)
  options = dict(block_d=32, block_t=32, unroll=4, layout="quarter_rows", share_channel_work=True, staged=False)
  interpret = mosaic_gpu.plgpu.InterpretGPUParams()
  y, last = mosaic_gpu.forward(
    *args,
    **options,
    reverse=reverse,
    gated=gated,
    epilogue=chunks == 3,
    chunks=chunks,
    last_state=True,
    interpret=interpret,
  )
  z = args[6] if gated else None
  expected = selective_scan(
    *args[:6], z, args[7], delta_softplus=True, reverse=reverse, return_last_state=True, impl="reference"
  )
  np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(last, expected[1], rtol=1e-5, atol=1e-5)


def test_chunked_bidirectional_in_place_matches_reference_in_interpret_mode():
  """In place, over inputs padded to whole blocks (the last of 22 positions), in chunks of 2 blocks, with the
  shipped options' float32 B and C rows, 8 positions per group and the epilogue."""
  forward_args, backward_args = (forward_inputs(2, 3 * 32 + 22, 32, jnp.float32, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  y = mosaic_gpu.bidirectional(
    *pair,
    forward_args[6],
    block_d=32,
    block_t=32,
    layout="quarter_rows",
    share_channel_work=True,
    f32_states=True,
    epilogue=True,
    unroll=8,
    in_place=True,
    staged=False,
    chunks=2,
    interpret=mosaic_gpu.plgpu.InterpretGPUParams(),
  )
  expected = selective_scan_bidirectional(*pair, forward_args[6], delta_softplus=True, impl="reference")
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [1, 2])
def test_state_pairs_read_what_f32_states_read_in_interpret_mode(chunks):
  """B and C packed as bf16 pairs in one word per state unpack to exactly the float32 rows `f32_states` stores: Vim's
  two directions in place, bf16, give the same bits."""
  forward_args, backward_args = (forward_inputs(2, 3 * 32 + 22, 64, jnp.bfloat16, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  options = dict(block_d=32, block_t=32, layout="quarter_rows", share_channel_work=True, epilogue=True, unroll=8)
  interpret = mosaic_gpu.plgpu.InterpretGPUParams()
  y_f32, y_pairs = (
    mosaic_gpu.bidirectional(
      *pair, forward_args[6], **options, **flag, in_place=True, staged=False, chunks=chunks, interpret=interpret
    )
    for flag in ({"f32_states": True}, {"state_pairs": True})
  )
  np.testing.assert_array_equal(y_pairs, y_f32)


@pytest.mark.parametrize(
  "layout, block_d, block_t, unroll, share_channel_work, f32_states, length",
  [
    ("wgmma", 128, 16, 1, False, False, 197),
    ("wgmma", 64, 32, 4, False, False, 197),
    ("rows", 128, 32, 4, False, False, 197),
    ("half_rows", 64, 16, 1, False, False, 197),
    ("quarter_rows", 32, 32, 4, True, False, 6085),
    ("rows", 128, 64, 1, True, False, 197),
    ("half_rows", 128, 32, 4, True, True, 197),
    ("quarter_rows", 32, 64, 4, True, True, 6085),
    ("quarter_rows", 32, 128, 8, True, True, 6085),
  ],
)
def test_forward_lowers_for_cuda_at_vim_tiny_shapes(
  layout, block_d, block_t, unroll, share_channel_work, f32_states, length
):
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, length, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  forward = functools.partial(
    mosaic_gpu.forward,
    block_d=block_d,
    block_t=block_t,
    unroll=unroll,
    layout=layout,
    share_channel_work=share_channel_work,
    f32_states=f32_states,
  )
  text = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def _innermost_loops(op) -> list:
  """The scf.for loops under `op` that hold no other loop."""
  loops, nested = [], False
  for region in op.regions:
    for block in region:
      for inner in block:
        found = _innermost_loops(inner)
        nested = nested or bool(found) or _is_loop(inner)
        loops += found
  return loops or ([op] if _is_loop(op) and not nested else [])


def _is_loop(op) -> bool:
  return op.name.endswith("scf.for")  # serialized, ops carry a version prefix ("stable_mosaic_gpu.scf.for")


@pytest.mark.parametrize(
  "auto_barriers, state_pairs, scatter_sums",
  [(False, False, False), (True, False, False), (False, True, False), (False, True, True)],
)
def test_the_position_loop_reads_first_and_holds_no_barrier(auto_barriers, state_pairs, scatter_sums):
  """A group of `unroll` positions loads all its inputs before it stores any y (C_t h_t, with the epilogue), and
  that store into shared memory gets no warpgroup barrier (Pallas adds two unless told not to; `auto_barriers=True`
  puts them back): the positions' loads and exps may overlap. With `state_pairs`, B and C are one load; with
  `scatter_sums`, each thread stores one position's sum per 4 positions."""
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  options = mosaic_gpu.SINGLE_OPTIONS | {
    "f32_states": not state_pairs,
    "state_pairs": state_pairs,
    "scatter_sums": scatter_sums,
  }
  forward = functools.partial(mosaic_gpu.forward, gated=False, auto_barriers=auto_barriers, **options)
  (module,) = kernel_modules(jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)))
  with module.context:
    (loop,) = [loop for loop in _innermost_loops(module.operation) if "ex2.approx" in str(loop)]
    names = [op.name.removeprefix("stable_mosaic_gpu.") for op in loop.regions[0].blocks[0]]
    assert str(loop).count("bar.sync") == (2 * options["unroll"] if auto_barriers else 0)
  loads = [i for i, name in enumerate(names) if name == "llvm.load"]
  stores = [i for i, name in enumerate(names) if name in ("llvm.store", "memref.store")]
  per_position = 3 if state_pairs else 4  # step size, u, and B and C together or apart
  assert len(loads) == per_position * options["unroll"]
  assert len(stores) == options["unroll"] // (4 if scatter_sums else 1)
  assert max(loads) < min(stores)


@pytest.mark.parametrize("chunks", [1, 2])
def test_scattered_sums_store_each_position_where_summed_ones_go_in_interpret_mode(chunks):
  """With `scatter_sums`, interpret mode stores each group's 4 sums in the rows their positions name (the
  reduce-scatter itself is Mosaic GPU code that only a GPU runs): Vim's two directions give the same bits."""
  forward_args, backward_args = (forward_inputs(2, 3 * 32 + 22, 64, jnp.bfloat16, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  options = dict(mosaic_gpu.OPTIONS, block_t=32, staged=False, chunks=chunks)
  interpret = mosaic_gpu.plgpu.InterpretGPUParams()
  y_summed, y_scattered = (
    mosaic_gpu.bidirectional(*pair, forward_args[6], **options | {"scatter_sums": scatter}, interpret=interpret)
    for scatter in (False, True)
  )
  np.testing.assert_array_equal(y_scattered, y_summed)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("scatter_sums, shuffles_per_4_positions", [(False, 8), (True, 3)])
def test_scattered_sums_take_3_shuffles_per_4_positions(reverse, scatter_sums, shuffles_per_4_positions):
  """Lowered for CUDA at Vim-Ti's 1248² shapes, the loop over `unroll` positions holds 2 butterfly shuffles per
  position as Mosaic GPU sums each position, 3 per 4 positions with the reduce-scatter, whose stores are each
  thread's own."""
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  options = mosaic_gpu.SINGLE_OPTIONS | {"scatter_sums": scatter_sums}
  forward = functools.partial(mosaic_gpu.forward, gated=False, reverse=reverse, **options)
  (module,) = kernel_modules(jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)))
  with module.context:
    (loop,) = [loop for loop in _innermost_loops(module.operation) if "ex2.approx" in str(loop)]
    assert str(loop).count("shfl.sync") == shuffles_per_4_positions * options["unroll"] // 4


def test_scattered_sums_add_products_as_contractible():
  """Each thread's sum of its 4 products C_t h_t may become FMAs: every add in the loop over `unroll` positions
  carries LLVM's contract flag, as Mosaic GPU's own arithmetic does, but the 3 per 4 positions that add values
  exchanged by shuffles."""
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  forward = functools.partial(mosaic_gpu.forward, gated=False, **mosaic_gpu.SINGLE_OPTIONS)
  (module,) = kernel_modules(jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",)))
  with module.context:
    (loop,) = [loop for loop in _innermost_loops(module.operation) if "ex2.approx" in str(loop)]
    adds = [line for line in str(loop).splitlines() if "arith.addf" in line]
  unroll = mosaic_gpu.SINGLE_OPTIONS["unroll"]
  assert mosaic_gpu.SINGLE_OPTIONS["scatter_sums"]
  shuffled = 3 * unroll // 4
  assert sum("contract" not in add for add in adds) == shuffled and len(adds) == shuffled + unroll * (1 + 3)  # h, sums


@pytest.mark.parametrize("stages", [2, 3])
def test_block_scratch_barriers_carry_no_async_proxy_fence(monkeypatch, stages):
  """Lowered for CUDA at Vim-Ti's 1248² shapes, each block's three barriers around its shared scratch (softplus and
  B and C pairs written, then read; C_t h_t written, then read) are plain warpgroup barriers: three fences of the
  async proxy fewer than with `commit_smem` there, as many barriers. With `stages` blocks in flight, the same."""
  args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  args = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in args]
  forward = functools.partial(mosaic_gpu.forward, gated=False, stages=stages, **mosaic_gpu.SINGLE_OPTIONS)

  def counts():  # a new function each time: traced again
    (module,) = kernel_modules(jax.jit(lambda *a: forward(*a)).trace(*args).lower(lowering_platforms=("cuda",)))
    return str(module).count("fence.proxy"), str(module).count("bar.sync")

  fences, barriers = counts()
  monkeypatch.setattr(mosaic_gpu, "_block_barrier", lambda inline: mosaic_gpu.plgpu.commit_smem())
  assert counts() == (fences + 3, barriers)


def test_stages_must_be_positive():
  with pytest.raises(ValueError, match="stages must be at least 1, got 0"):
    mosaic_gpu.forward(*forward_inputs(1, 64, 32, jnp.bfloat16), **mosaic_gpu.SINGLE_OPTIONS | {"stages": 0})


@pytest.mark.parametrize(
  "options", [dict(epilogue=False), dict(layout="half_rows", block_d=64), dict(unroll=2), dict(block_t=32, unroll=12)]
)
def test_scattered_sums_need_the_epilogue_quarter_rows_and_groups_of_4(options):
  with pytest.raises(ValueError, match="scatter_sums"):
    mosaic_gpu.forward(
      *forward_inputs(1, 64, 128, jnp.bfloat16), **mosaic_gpu.SINGLE_OPTIONS | options | {"scatter_sums": True}
    )


def _as_windows(direction: Direction, key) -> Direction:
  """`direction` with B and C as `Columns` of one (batch, length, 48) array, [step | B | C] as x_proj writes them."""
  step = jax.random.normal(key, direction.B.shape, jnp.float32).astype(direction.B.dtype)
  projected = jnp.concatenate([step, direction.B, direction.C], axis=-1)
  return direction._replace(B=Columns(projected, 16, 16), C=Columns(projected, 32, 16))


@pytest.mark.parametrize("chunks", [1, 2])
def test_state_and_gate_windows_are_read_in_place_in_interpret_mode(chunks):
  """B and C as windows of x_proj's output and z as the second half of in_proj's give the bits that the sliced arrays
  give, with the shipped options."""
  forward_args, backward_args = (forward_inputs(2, 3 * 32 + 22, 64, jnp.bfloat16, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  windows = [_as_windows(d, jax.random.key(i)) for i, d in enumerate(pair)]
  z = forward_args[6]
  z_window = Columns(jnp.concatenate([jnp.flip(z, axis=1), z], axis=-1), 64, 64)
  options = dict(mosaic_gpu.OPTIONS, block_t=32, staged=False, chunks=chunks)
  interpret = mosaic_gpu.plgpu.InterpretGPUParams()
  y_sliced, y_windows = (
    mosaic_gpu.bidirectional(*p, gate, **options, interpret=interpret) for p, gate in ((pair, z), (windows, z_window))
  )
  np.testing.assert_array_equal(y_windows, y_sliced)


def test_state_and_gate_windows_lower_for_cuda_without_slices():
  """At Vim-Ti's 1248² shapes, B's and C's TMA copies read x_proj's (batch, length, 48) output where it lies, z's
  in_proj's (batch, length, 768)."""
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  projected = jax.ShapeDtypeStruct((32, 6085, 48), jnp.bfloat16)
  direction = Direction(*shapes[:3], Columns(projected, 16, 16), Columns(projected, 32, 16), shapes[5], shapes[7])
  z = Columns(jax.ShapeDtypeStruct((32, 6085, 768), jnp.bfloat16), 384, 384)
  bidirectional = functools.partial(mosaic_gpu.bidirectional, **mosaic_gpu.OPTIONS)
  text = jax.jit(bidirectional).trace(direction, direction, z).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu_v2") == 2
  assert "stablehlo.slice" not in text
  assert "tensor<32x6085x768xbf16>" in text


@pytest.mark.parametrize("in_place", [False, True])
def test_bidirectional_lowers_for_cuda_at_vim_tiny_1248_shapes(in_place):
  """In place, both launches alias an input to their output (a new buffer for neither)."""
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((32, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  direction = Direction(*shapes[:6], shapes[7])
  bidirectional = functools.partial(
    mosaic_gpu.bidirectional,
    block_d=32,
    block_t=32,
    unroll=4,
    layout="quarter_rows",
    share_channel_work=True,
    in_place=in_place,
  )
  text = jax.jit(bidirectional).trace(direction, direction, shapes[6]).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2
  assert text.count("output_operand_alias<") == (2 if in_place else 0)


@pytest.mark.parametrize("in_place", [False, True])
def test_chunked_bidirectional_lowers_for_cuda_at_vim_tiny_1248_batch_8(in_place):
  """Four chunks: per direction a launch for the chunks' end states and one for y (in place, over an input)."""
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((8, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  direction = Direction(*shapes[:6], shapes[7])
  options = dict(mosaic_gpu.OPTIONS, in_place=in_place)
  bidirectional = functools.partial(mosaic_gpu.bidirectional, **options, chunks=4)
  text = jax.jit(bidirectional).trace(direction, direction, shapes[6]).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu_v2") == 4
  assert text.count("output_operand_alias<") == (2 if in_place else 0)


@pytest.mark.parametrize("option", ["f32_states", "state_pairs", "epilogue"])
def test_options_of_shared_work_need_it(option):
  with pytest.raises(ValueError, match=option):
    mosaic_gpu.forward(
      *forward_inputs(1, 64, 32, jnp.bfloat16), block_d=32, block_t=32, layout="quarter_rows", **{option: True}
    )


@pytest.mark.parametrize("dtype, f32_states", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_state_pairs_take_bf16_and_replace_f32_states(dtype, f32_states):
  with pytest.raises(ValueError, match="state_pairs"):
    mosaic_gpu.forward(
      *forward_inputs(1, 64, 32, dtype),
      block_d=32,
      block_t=32,
      layout="quarter_rows",
      share_channel_work=True,
      f32_states=f32_states,
      state_pairs=True,
    )


def test_chunks_need_blocks():
  with pytest.raises(ValueError, match="chunks"):
    mosaic_gpu.forward(*forward_inputs(1, 64, 32, jnp.float32), block_d=32, layout="quarter_rows", chunks=2)


def test_forward_refuses_a_block_off_the_layouts_channels():
  with pytest.raises(ValueError, match="multiple of block_d \\(64\\), itself of 128"):
    mosaic_gpu.forward(*forward_inputs(1, 3, 128, jnp.float32), block_d=64, layout="rows")


@pytest.mark.parametrize(
  "batch, length, dtype, capability, expected",
  [
    (32, 6085, jnp.bfloat16, "9.0", True),  # Vim-Ti 1248², batch 32: 384 programs
    (32, 4097, jnp.bfloat16, "9.0", True),  # 1024²
    (8, 6085, jnp.bfloat16, "9.0", True),  # 96 programs, in 4 chunks
    (1, 6085, jnp.bfloat16, "9.0", True),  # 12 programs, in 32 chunks
    (64, 2117, jnp.bfloat16, "9.0", True),  # 736²
    (128, 730, jnp.bfloat16, "9.0", True),  # 224², stride 8: the shortest measured no slower
    (128, 197, jnp.bfloat16, "9.0", False),  # 224²: slower than Triton there
    (32, 6085, jnp.float32, "9.0", False),  # measured in bf16 only
    (32, 6085, jnp.bfloat16, "8.0", False),  # Mosaic GPU needs Hopper
    (32, 6085, jnp.bfloat16, None, False),  # no GPU
  ],
)
def test_fits_only_where_measured_faster(batch, length, dtype, capability, expected):
  assert mosaic_gpu.fits(batch, length, 384, 16, dtype, capability) is expected


@pytest.mark.parametrize("batch, chunks", [(32, 1), (64, 1), (8, 4), (2, 16), (1, 32)])
def test_chunks_fill_the_gpu_where_the_batch_does_not(batch, chunks):
  """Vim-Ti's 384 channels in blocks of 32: 12 programs per sequence, FITS_PROGRAMS (384) at least in all."""
  assert mosaic_gpu.chunks_to_fill(batch, 384) == chunks


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize(
  "batch, differentiated, states_dtype, gated, launches",
  [
    (32, False, jnp.bfloat16, True, 2),
    (32, True, jnp.bfloat16, True, 0),
    (8, False, jnp.bfloat16, True, 4),
    (32, False, jnp.float32, True, 0),
    (32, False, jnp.bfloat16, False, 0),
  ],
)
def test_pallas_gpu_runs_the_one_pass_forward_where_it_fits(
  monkeypatch, batch, differentiated, states_dtype, gated, launches
):
  """On a Hopper GPU (stood in for by an abstract H100), Vim's fused call at 1248² runs the Mosaic GPU forward,
  in place, where nothing is differentiated: a launch per direction at batch 32, two at batch 8 (the chunks' end
  states, then y); Triton's kernels where something is differentiated, B and C are not bf16 or there is no gate.
  B and C are windows of x_proj's output, as the model passes them, which the Mosaic forward reads without a
  slice."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  monkeypatch.setattr(mosaic_gpu, "compute_capability", lambda: "9.0")
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((batch, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  projected = jax.ShapeDtypeStruct((batch, 6085, 48), states_dtype)
  shapes[3:5] = Columns(projected, 16, 16), Columns(projected, 32, 16)  # B and C
  shapes[6] = shapes[6] if gated else None  # z
  direction = Direction(*shapes[:6], shapes[7])

  def call(forward, backward, z):
    return selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl="pallas_gpu")

  fn = (lambda *args: jax.grad(lambda *a: jnp.sum(call(*a)), argnums=2)(*args)) if differentiated else call
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fn).trace(direction, direction, shapes[6]).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("mosaic_gpu_v2") == launches
  assert ("xla.gpu.triton" in hlo) != bool(launches)
  assert hlo.count("output_operand_alias<") >= (2 if launches else 0)
  assert "stablehlo.slice" not in hlo or not launches


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("differentiated", [False, True])
@pytest.mark.parametrize("batch", [32, 8])
def test_pallas_gpu_runs_one_direction_in_one_pass_where_it_fits(monkeypatch, batch, differentiated, gated):
  """A single scan (`selective_scan`, y and its last state) at 1248² on Hopper runs the Mosaic GPU forward where
  nothing is differentiated (at batch 8 in chunks: a launch for their end states first), Triton's kernels where
  something is; gated in reverse, ungated forward, which zeroes the step sizes past the sequence's end."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  monkeypatch.setattr(mosaic_gpu, "compute_capability", lambda: "9.0")
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in forward_inputs(1, 1, 384, jnp.bfloat16)]
  shapes = [jax.ShapeDtypeStruct((batch, 6085, *x.shape[2:]), x.dtype) if x.ndim == 3 else x for x in shapes]
  if not gated:
    shapes[6] = None

  def call(*args):
    return selective_scan(*args, delta_softplus=True, reverse=gated, return_last_state=True, impl="pallas_gpu")

  fn = (lambda *args: jax.grad(lambda u: jnp.sum(call(u, *args[1:])[1]))(args[0])) if differentiated else call
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert hlo.count("mosaic_gpu_v2") == (0 if differentiated else 1 if batch == 32 else 2)
  assert ("xla.gpu.triton" in hlo) == differentiated


@pytest.mark.parametrize("share_step_u", [False, True])
def test_shipped_options_leave_room_for_three_programs_a_multiprocessor(share_step_u):
  """Vim-Ti at 1248² (and 1024²), batch 32, launches 384 programs per direction: an H100's 132 multiprocessors must
  hold three each, which shared memory decides (both launches, read from the CUDA lowering). Options that broke this
  were slower on the card (blocks of 128 positions; `share_step_u` in both directions, whose gated launch held 76
  KiB): `bidirectional` gives `share_step_u` to the forward direction alone."""
  options = mosaic_gpu.OPTIONS | {"share_step_u": share_step_u}
  lowered = vim_bidirectional_lowered(32, 6085, options)
  sizes = launch_shared_memory(lowered)
  assert len(sizes) == 2
  programs = -(-32 * 384 // mosaic_gpu.OPTIONS["block_d"] // 132)
  assert all(programs_per_multiprocessor(size) >= programs == 3 for size in sizes), sizes


@pytest.mark.parametrize("chunks", [1, 2])
def test_shared_step_u_gives_the_same_bits_in_interpret_mode(chunks):
  """`share_step_u` (the forward direction's step size times u computed once per block) changes where delta_t u_t is
  multiplied, not its value: Vim's combined output is bit for bit the same, whole and in chunks."""
  forward_args, backward_args = (forward_inputs(2, 3 * 32 + 22, 64, jnp.bfloat16, seed=seed) for seed in (0, 1))
  pair = [Direction(*args[:6], args[7]) for args in (forward_args, backward_args)]
  options = dict(mosaic_gpu.OPTIONS, block_t=32, staged=False, chunks=chunks)
  y_plain, y_shared = (
    mosaic_gpu.bidirectional(
      *pair, forward_args[6], **options | {"share_step_u": shared}, interpret=mosaic_gpu.plgpu.InterpretGPUParams()
    )
    for shared in (False, True)
  )
  np.testing.assert_array_equal(y_shared, y_plain)


def test_share_step_u_needs_the_epilogue():
  with pytest.raises(ValueError, match="share_step_u needs the epilogue"):
    mosaic_gpu.forward(
      *forward_inputs(1, 64, 32, jnp.bfloat16), **mosaic_gpu.SINGLE_OPTIONS | {"epilogue": False, "share_step_u": True}
    )
