r"""Vim's fused bidirectional forward as one pass per direction, a Pallas Mosaic GPU kernel for Hopper (inference).

One warpgroup per (sequence, block of channels) walks the whole sequence once, its (channels, state) state in
registers in the layout `layout` names (`LAYOUTS`), blocks of `block_t` positions staged through shared memory by
TMA (`emit_pipeline`, the next block's copies in flight). With `share_channel_work` the warpgroup first computes a
block's softplus and silu(z) gate once per (position, channel) into shared memory, where the threads of a channel
read them; with `f32_states` also B's and C's rows, converted to float32 once per block. `bidirectional` runs
Vim's two directions and their combine in two launches, as the Triton kernels do: the backward direction walks the
blocks and positions last first and reads the forward one's ungated y. Where sequences are too few to fill the GPU,
`chunks` splits them (`_Chunks`): a launch for the chunks' end states from a zero start, then one for y, each chunk
started from the state the earlier ones carry to it.

Why it exists beside the Triton kernels (`pallas_gpu`): where sequences are long and many, the Triton forward runs
in two chunked passes (chunk ends, then outputs), each with the exp unit's full load; one pass here does that
work once. NVIDIA H200, jax 0.11.2, bf16, Vim-Ti shapes (experiments/results, thirtieth session): one direction at
1248², batch 32 0.99 ms against Triton's 1.14 (`quarter_rows`, block_d 32, block_t 64, shared work; the other
layouts 1.05-1.57); both directions with the combine 1.95 (2.02 in place) against 2.28; Vim-Ti's whole forward
63.2 against 70.0 ms at 1248² and 44.2 against 49.0 at 1024². At 224², batch 128 (197 positions) it was slower
(0.108 ms at best against 0.099), so `pallas_gpu` calls it only where `fits` says (the measured shapes), and only
without gradients (there is no backward): for Vim's fused call, and for one direction with its last state
(`last_state`). Those times had two warpgroup barriers at every position, which Pallas puts around each store to
shared memory, and each position's loads behind the last one's store. The loads now come first (`_walk`): one
direction at 1248², batch 32 0.80 ms (thirty-third session). `auto_barriers=False` leaves the barriers out (the
comment at `plgpu.kernel`): 0.72 ms, 0.71 with `f32_states`. racecheck found no hazard without them (H100,
thirty-fourth session), so `OPTIONS` leaves them out: both directions at 1248², batch 32 1.43 ms against 1.65 with
them and Triton's 2.28 (H100). Chunks fill the GPU where the batch does not (`chunks_to_fill`): both directions at
1248², batch 8 0.60 ms against Triton's 0.76, at batch 1 0.10 against 0.28 (H100). In Nsight Compute the loop
then ran nearest the shared-memory unit's ceiling (89%; ncu_mosaic_forward_1248_b32_h100.md): B's and C's float32
rows cost 8 of a warp's 11-13 wavefronts per position. `epilogue` takes y's skip, combine and gate out of the loop
and `unroll` 8 walks positions in groups of 8: both directions 1.38 ms, Vim-Ti's forward 51.8 against 53.6 ms
(1248², batch 32, H100, thirty-fifth session). `state_pairs` reads B and C as bf16 pairs, one 128-bit load per
position: both directions 1.28 ms against 1.35, Vim-Ti 45.5 against 47.4 ms (H200, thirty-sixth session). B and C
are read where x_proj wrote them (`Columns`, no slice). `scatter_sums` cuts y's shuffles from 8 to 3 per 4
positions and its stores from 4 wavefronts to 1 (`_store_scattered_sums`): both directions 1.287 ms against 1.299,
Vim-Ti 49.0 against 49.6 ms (1248², batch 32, H100, thirty-seventh session). With all that, both directions are
faster than Triton's from 730 positions on (0.64 against 0.70 ms at 224², stride 8, batch 128; 0.91 against 1.58 at
736², batch 64; H100, thirty-eighth session), where `fits` now lets it run. Nsight Compute of that (thirty-ninth
session, ncu_mosaic_forward_shipped_1248_b32_h100.md): shared memory no longer binds (L1 60% busy); instruction issue
does (issue slots 75% busy, most stall samples "selected" or "not selected"), 325 instructions per 8 positions. So
each thread's sum of its 4 products C_t h_t adds with LLVM's contract flag (`_contracted_add`): one multiply and
three FMAs instead of four multiplies and three adds, both directions 1.264 ms against 1.289 at 1248², batch 32,
0.867 against 0.884 at 1024² (H100, mosaic_patch_ab.py, scan_mosaic_gpu_contracted_sums_h100.txt). The loop is then
301 instructions per 8 positions, and the code once per block 14-21% of those executed but 26-30% of the stall
samples (ncu_mosaic_forward_contracted_1248_b32_h100.md). Groups of 16 positions (`unroll`) take both directions
from 1.258 to 1.228 ms at 1248², batch 32 and 0.862 to 0.841 at 1024², Vim-Ti's forward from 47.10 to 46.36 ms at
1248² (H100, fortieth session, scan_mosaic_gpu_unroll_h100.txt, ab_mosaic_unroll16_vim_tiny_h100.txt); groups of 32
take both directions to 1.211 and 0.830 ms, and Vim-Ti's forward from 45.86 to 45.51 ms at 1248², 31.29 to 31.14 at
1024² (H100, forty-fourth session, ab_mosaic_unroll32_vim_tiny_h100.txt).
Three blocks' copies in flight (`stages`) or blocks of 128 positions were slower (1.36 and 1.66 ms against 1.25,
scan_mosaic_gpu_stages_block_t_h100.json; by its buffers' sizes, the gated direction's program then leaves room for two
per SM, where these shapes' 384 programs need three), float32 B and C rows (`f32_states`) too (1.27-1.30 ms).

Mosaic GPU needs sm_90 (Hopper) and its API still moves: this lowers on jax 0.11.2 and 0.12 (tests lower it for
CUDA on CPU and run its math in interpret mode, which reads blocks from HBM in place (`staged=False`) because it
cannot run the staged copies).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector

from kernels.selective_scan.columns import Columns


def _tiled(tiles, warp_dims, lane_dims):
  return plgpu.Layout.TILED(plgpu.Tiling(tiles), warp_dims=warp_dims, lane_dims=lane_dims, vector_dim=-1)


# Register layouts of the (channels, state) state tile, with the channels a warpgroup holds (`block_d` is a multiple).
# A per-channel vector takes the tile's layout reduced over the state, a per-state one over the channels.
LAYOUTS = {
  # WGMMA's: a thread holds 2 channels x 4 states (state a multiple of 8), so a quad repeats each channel's
  # softplus, skip and gate, and y's sum over the state crosses the quad.
  "wgmma": (plgpu.Layout.WGMMA, 64),
  # A channel per thread, its whole state of 16 in the thread, as the Triton by-channel forward: per-channel work
  # once and y's sum within the thread; B_t and C_t whole in every thread.
  "rows": (_tiled(((128, 16), (32, 16)), (-4,), (-2,)), 128),
  # A channel per two threads, 8 states each: twice the warps of "rows", per-channel work twice.
  "half_rows": (_tiled(((64, 16), (16, 16), (8,)), (-5,), (-3, -2)), 64),
  # A channel per four threads, 4 states each: four times the warps of "rows".
  "quarter_rows": (_tiled(((32, 16), (8, 16), (4,)), (-5,), (-3, -2)), 32),
}
_STATE_OF = {"rows": 16, "half_rows": 16, "quarter_rows": 16}  # the state size the tiled layouts are written for


def _load(ref, layout):
  return plgpu.load(ref, layout=layout, optimized=False).astype(jnp.float32)


def _state_block(x: jax.Array | Columns, state: int) -> tuple[jax.Array, int]:
  """B or C as the kernel reads it: an array and the index of its block of `state` columns. A `Columns` window that is
  such a block (B's and C's in x_proj's output) is read where it lies, by TMA: no slice before the launch."""
  if not isinstance(x, Columns):
    return x, 0
  block = x.block(state)
  return (x.value(), 0) if block is None else (x.array, block)


def _channel_window(x: jax.Array | Columns, block_d: int) -> tuple[jax.Array, int]:
  """A (batch, length, channels) input as the kernel reads it: an array and the index of its first block of `block_d`
  columns. A `Columns` window of whole blocks (z in in_proj's output) is read in place by TMA: no slice before."""
  first = x.first_block(block_d) if isinstance(x, Columns) else None
  if first is None:
    return (x.value() if isinstance(x, Columns) else x), 0
  return x.array, first


def _state_pairs(b: jax.Array, c: jax.Array) -> jax.Array:
  """bf16 B and C as one uint32 word per state: B's bits low, C's high."""
  bits = [lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) for x in (b, c)]
  return bits[0] | (bits[1] << 16)


def _unpaired(word: jax.Array) -> dict:
  """B and C in float32 from `_state_pairs`'s words (a bf16's bits are a float32's high half)."""
  as_f32 = functools.partial(lax.bitcast_convert_type, new_dtype=jnp.float32)
  return {"B": as_f32(word << 16), "C": as_f32(word & jnp.uint32(0xFFFF0000))}


def _softplus(x: jax.Array) -> jax.Array:
  return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(x)))


def _gate(z: jax.Array) -> jax.Array:
  return z / (1.0 + jnp.exp(-z))


class _Combine(NamedTuple):
  """What a direction's y becomes: averaged with the other direction's (`partner`), then gated by silu(z)."""

  gated: bool
  partner: bool


def _inputs(rows_at, cols_at, combine, ends: bool = False, step_u: bool = False) -> dict:
  """What one position reads, from loaders of its per-channel inputs ("step_size", the softplus of delta + bias;
  "u"; "gate", silu(z); "partner", the other direction's y) and per-state ones ("B", "C"); for a chunk's end state
  (`ends`) only the step size, u and B. With `step_u`, the step size times u ("step_u") instead of u: the skip is
  then added outside the walk (the epilogue), where u is read again."""
  u = ("step_u",) if step_u else ("u",)
  if ends:
    return {name: rows_at(name) for name in ("step_size", *u)} | {"B": cols_at("B")}
  names = ("step_size", *u) + ("partner",) * combine.partner + ("gate",) * combine.gated
  return {name: rows_at(name) for name in names} | {name: cols_at(name) for name in ("B", "C")}


def _rows(v, shape):
  """A per-channel vector across a (channels, state) tile."""
  return lax.broadcast_in_dim(v, shape, [0])


def _cols(v, shape):
  """A per-state vector down a (channels, state) tile."""
  return lax.broadcast_in_dim(v, shape, [1])


def _next_state(h, inputs: dict, a_log2):
  """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t."""
  delta, shape = inputs["step_size"], h.shape
  step_u = inputs["step_u"] if "step_u" in inputs else delta * inputs["u"]
  return jnp.exp2(_rows(delta, shape) * a_log2) * h + _rows(step_u, shape) * _cols(inputs["B"], shape)


def _update(h, inputs: dict, *, a_log2, skip, combine, summed: bool = True):
  """One position's state update and output: (h_t, y_t); without `skip`, y_t is C_t h_t alone (the block's epilogue
  finishes it); not `summed`, the (channels, state) product C_t ⊙ h_t (`_store_scattered_sums` sums it)."""
  h = _next_state(h, inputs, a_log2)
  product = h * _cols(inputs["C"], h.shape)
  if not summed:
    return h, product
  y = product.sum(axis=1)
  return h, y if skip is None else _finish(y, inputs, skip=skip, combine=combine)


_SCATTERED = 4  # positions per reduce-scatter: one per thread of a channel in `quarter_rows`
_QUARTER_DIM = -2  # `quarter_rows`'s tiled dimension of a channel's four threads (`_tiled`'s lane_dims)


def _swizzled_column(row: ir.Value, channel: ir.Value) -> ir.Value:
  """Where `_store_scattered_sums` puts (row, channel) of C_t h_t: in its row, at channel XOR 8 (row mod 4). A warp's
  scattered stores, 8 channels at 4 consecutive rows 32 floats apart, then meet in 32 different banks, where in
  place they would meet in 8 (4 wavefronts); a row stays one row, which the epilogue reads in one wavefront."""
  index = ir.IndexType.get()
  eights = arith.muli(arith.andi(row, mgpu_utils.c(_SCATTERED - 1, index)), mgpu_utils.c(8, index))
  return arith.xori(channel, eights)


def _load_c_h(ref, shape: tuple[int, int], *, swizzled: bool) -> jax.Array:
  """The block's C_t h_t in `_SPREAD`, the epilogue's layout; `swizzled`, from where `_store_scattered_sums` put it."""
  if not swizzled:
    return _load(ref, _SPREAD)

  @plgpu.inline_mgpu(
    arg_types=(plgpu.RefType(),), return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=_SPREAD)
  )
  def load(ctx, ref):
    del ctx
    layout = _SPREAD.to_mgpu()
    register_type = layout.registers_element_type(ir.F32Type.get())
    assert ir.VectorType(register_type).shape == [1], register_type  # an element per register
    registers = np.empty(layout.registers_shape(shape), dtype=object)
    for i, (row, channel) in zip(np.ndindex(registers.shape), layout.thread_idxs(shape), strict=True):
      registers[i] = vector.broadcast(register_type, memref.load(ref, [row, _swizzled_column(row, channel)]))
    return mgpu.FragmentedArray(_registers=registers, _layout=layout, _is_signed=None)

  return load(ref)


def _contracted_add(a: ir.Value, b: ir.Value) -> ir.Value:
  """a + b that LLVM may fuse with a product operand into an FMA, as Mosaic GPU's own arithmetic allows (a product's
  contract flag alone does not): a thread's sum of its 4 products C_t h_t is then one multiply and three FMAs."""
  return arith.addf(a, b, fastmath=arith.FastMathFlags.contract)


def _store_scattered_sums(products: list, rows_ref, *, reverse: bool, inline: bool) -> None:
  """rows_ref[k] = products[k].sum(axis=1) for 4 positions' (block_d, 16) products C_t ⊙ h_t in `quarter_rows`, the
  last position walked first if `reverse` (rows_ref's rows in sequence order).

  Summed one position at a time, each of a channel's four threads adds its 4 states, then two butterfly shuffles
  give every one of them the whole sum: 8 shuffles for 4 positions, on the shared-memory unit that binds the loop.
  A reduce-scatter gives each thread one position's sum in 3: halves of the positions cross between thread pairs
  two lanes apart, then single positions between neighbours; each thread stores its own. Pallas has no such
  reduction, so it is Mosaic GPU code (`plgpu.inline_mgpu`), which interpret mode cannot run: there (`inline`
  False) each position's sum is stored as `_update` sums it. The stores go where `_swizzled_column` says (and the
  epilogue reads them back from there, `_load_c_h`): in one wavefront per 4 positions instead of 4. Rows start at
  multiples of 4 positions (`forward` checks that groups of `unroll` tile the blocks)."""
  if not inline:
    for k, product in enumerate(products):
      rows_ref[_SCATTERED - 1 - k if reverse else k] = product.sum(axis=1)
    return
  layout = LAYOUTS["quarter_rows"][0]

  @plgpu.inline_mgpu(arg_types=((layout,) * _SCATTERED, plgpu.RefType()))
  def store(ctx, arrays, ref):
    del ctx
    index = ir.IndexType.get()
    constant = functools.partial(mgpu_utils.c, ty=index)
    tiles = arrays[0].layout
    quarter_lanes = 1  # the lane stride between a channel's quarters: the lane dims minor to theirs
    for dim in reversed(tiles.lane_dims):
      if dim == _QUARTER_DIM:
        break
      quarter_lanes *= tiles.tiled_tiling_shape[dim]
    # A register per 32 channels a thread holds (one at block_d 32), each the thread's 4 states of its channel.
    for r, (channel, first_state) in enumerate(tiles.thread_idxs(arrays[0].shape)):
      sums = []
      for array in arrays:
        register = array.registers.flat[r]
        (size,) = ir.VectorType(register.type).shape
        states = [
          vector.extract(register, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([i]))
          for i in range(size)
        ]
        sums.append(functools.reduce(_contracted_add, states))
      quarter = arith.divui(first_state, constant(size))
      high, low = (
        arith.cmpi(arith.CmpIPredicate.ne, arith.andi(quarter, constant(bit)), constant(0)) for bit in (2, 1)
      )
      # Positions 2 and 3 to the threads of quarters 2 and 3, 0 and 1 to the others (their partners 2 apart) ...
      halves = [
        arith.addf(
          arith.select(high, sums[k + 2], sums[k]),
          mgpu_utils.shfl_bfly(arith.select(high, sums[k], sums[k + 2]), 2 * quarter_lanes),
        )
        for k in (0, 1)
      ]
      # ... then one of those two to each of a pair of neighbouring quarters: position 2 high + low.
      kept, sent = arith.select(low, halves[1], halves[0]), arith.select(low, halves[0], halves[1])
      total = arith.addf(kept, mgpu_utils.shfl_bfly(sent, quarter_lanes))
      position = arith.addi(*(arith.select(b, constant(v), constant(0)) for b, v in ((high, 2), (low, 1))))
      if reverse:
        position = arith.subi(constant(_SCATTERED - 1), position)
      memref.store(total, ref, [position, _swizzled_column(position, channel)])

  store(tuple(products), rows_ref)


def _block_barrier(inline: bool) -> None:
  """A warpgroup barrier between one thread's stores to the block's shared scratch and another thread's loads of them.
  `commit_smem` would add a fence of the async proxy, which only TMA's and WGMMA's reads need: the scratch is read and
  written by the threads alone, and the pipeline commits y's block before its TMA store. Interpret mode cannot run
  Mosaic GPU code (`inline` False) and needs no barrier. Both directions at 1248², batch 32: 1.258 against 1.261 ms,
  at 1024² 0.861 against 0.866, within the rounds' spread (H100, mosaic_patch_ab.py,
  scan_mosaic_gpu_block_barriers_h100.txt); racecheck finds no hazard (racecheck_mosaic_block_barriers_h100.txt)."""
  if inline:
    plgpu.inline_mgpu()(lambda ctx: mgpu_utils.warpgroup_barrier())()


def _finish(y, inputs: dict, *, skip, combine):
  """y from C_t h_t: the skip, then the combine."""
  y = y + skip * inputs["u"]
  if combine.partner:
    y = (y + inputs["partner"]) * 0.5
  return y * inputs["gate"] if combine.gated else y


def _end_update(carry, inputs: dict, *, a_log2):
  """One position of a chunk's walk to its end state: ((h_t, the step sizes' running total), no output)."""
  h, total = carry
  return (_next_state(h, inputs, a_log2), total + inputs["step_size"]), None


def _raw_rows(load, bias):
  """`_inputs`'s per-channel loader from one of the raw inputs' rows (`load(name)`): each thread computes the
  softplus and the gate of the channels it holds."""

  def rows_at(name):
    if name == "step_size":
      return _softplus(load("delta") + bias)
    if name == "gate":
      return _gate(load("z"))
    return load(name)

  return rows_at


def _walk(read, update, write, length: int, h, unroll: int, reverse: bool):
  """h through `update(h, read(t)) -> (h, y)` for t over range(length), last first if `reverse`, each group's
  positions and ys (unless None) to `write(positions, ys)`. Positions go in groups of `unroll` whose reads all come
  before their writes: a read may not move past a write to shared memory that the compiler cannot tell apart, so per
  position, each load would wait for the last position's whole update."""
  position = (lambda i: length - 1 - i) if reverse else (lambda i: i)

  def group(first, size, h):
    positions = [position(first + k) for k in range(size)]
    inputs = [read(t) for t in positions]
    ys = []
    for values in inputs:
      h, y = update(h, values)
      ys.append(y)
    if ys[0] is not None:
      write(positions, ys)
    return h

  h = lax.fori_loop(0, length // unroll, lambda i, h: group(i * unroll, unroll, h), h)
  if length % unroll:  # the rest one at a time
    h = lax.fori_loop(length // unroll * unroll, length, lambda i, h: group(i, 1, h), h)
  return h


# A (positions, channels) block spread over the warpgroup with no element held twice: lanes over 32 channels, warps
# over four groups of positions, each thread the rest of its channel's positions (blocks of 32 x 32 multiples).
_SPREAD = _tiled(((32, 32), (8, 32), (1,)), (-5,), (-2,))


class _Chunks(NamedTuple):
  """The sequence as `count` chunks of `blocks` blocks of positions (the last chunk may be shorter); one chunk is
  the whole sequence. With several, the `ends` launch walks every chunk but the one walked last from a zero state
  and writes its end state and the total of its step sizes; the outputs launch starts each chunk from the state that
  the chunks walked before it carry to its start: h -> exp(A total) h + end state, a step per chunk."""

  count: int = 1
  blocks: int = 0
  ends: bool = False


def _forward_kernel(
  *refs,
  seq_names,
  seq_blocks,
  block_d,
  block_t,
  unroll,
  layout,
  staged,
  stages,
  share,
  share_step_u,
  f32_states,
  state_pairs,
  epilogue,
  scatter_sums,
  inline,
  state_columns,
  reverse,
  combine,
  y_over,
  chunks,
  last_state,
  length,
):
  """refs: the (batch, length, channels) inputs named by `seq_names` (each read from its `seq_blocks` block of
  block_d columns on: z may be a window of a wider array), then B, C (each its `state_columns` block of
  state-wide columns of a (batch, length, width) array), A, D and delta_bias; with several chunks, the (batch,
  chunks, channels, state) end states and (batch, chunks, channels) step totals (inputs of the outputs launch,
  outputs of the ends launch); then y (outputs launch, unless y goes over the input `y_over`: each block of it is read
  before y is written there); then, with `last_state`, the (batch, channels, state) state after the last position
  walked (outputs launch). `length` is the sequences' own: a last block past it reads zeros (TMA's fill out of
  bounds, or `forward`'s padding). `inline` (not interpret mode) runs `scatter_sums`'s Mosaic GPU code."""
  seq_refs = dict(zip(seq_names, refs[: len(seq_names)], strict=True))
  epilogue = epilogue and not chunks.ends  # the ends launch has no y
  scatter_sums = scatter_sums and epilogue
  b_ref, c_ref, a_ref, d_ref, bias_ref, *rest = refs[len(seq_names) :]
  ends_ref, totals_ref = rest[:2] if chunks.count > 1 else (None, None)
  last_ref = rest[-1] if last_state else None
  y_ref = None if chunks.ends else seq_refs[y_over] if y_over else rest[-2] if last_state else rest[-1]
  tile = LAYOUTS[layout][0]
  per_channel, per_state = tile.reduce(1), tile.reduce(0)
  sequence, block = lax.axis_index("sequence"), lax.axis_index("block")
  channels = pl.ds(block * block_d, block_d)
  seq_channels = {  # each input's channels, from its first block on
    name: pl.ds((block + first) * block_d, block_d) for name, first in zip(seq_names, seq_blocks, strict=True)
  }
  a_log2 = _load(a_ref.at[channels, :], tile) * math.log2(math.e)
  skip, bias = _load(d_ref.at[channels], per_channel), _load(bias_ref.at[channels], per_channel)
  state = a_ref.shape[1]
  zeros = plgpu.layout_cast(jnp.zeros((block_d, state), jnp.float32), tile)
  states = dict(B=b_ref, C=c_ref)
  state_names = ("B",) if chunks.ends else ("B", "C")  # what this launch reads
  column_block = dict(zip(states, state_columns, strict=True))
  columns = {name: pl.ds(index * state, state) for name, index in column_block.items()}
  if chunks.ends:
    update = functools.partial(_end_update, a_log2=a_log2)
  else:
    update = functools.partial(
      _update, a_log2=a_log2, skip=None if epilogue else skip, combine=combine, summed=not scatter_sums
    )

  if not block_t:  # every load straight from HBM (one chunk)

    def read(t):
      rows_at = _raw_rows(lambda k: _load(seq_refs[k].at[sequence, t, seq_channels[k]], per_channel), bias)
      return _inputs(rows_at, lambda k: _load(states[k].at[sequence, t, columns[k]], per_state), combine)

    def write(positions, ys):
      for t, y in zip(positions, ys, strict=True):
        y_ref[sequence, t, channels] = y.astype(y_ref.dtype)

    h = _walk(read, update, write, length, zeros, unroll, reverse)
    if last_state:
      last_ref[sequence, channels, :] = h
    return

  # This program's chunk and its blocks. The ends launch has no program for the chunk walked last (its end is no
  # other chunk's start): the last one going forward, the first one in reverse.
  num_blocks = pl.cdiv(length, block_t)
  if chunks.count == 1:
    chunk, first, count = 0, 0, num_blocks
  else:
    chunk = lax.axis_index("chunk") + int(chunks.ends and reverse)
    first = chunk * chunks.blocks
    count = jnp.minimum(chunks.blocks, num_blocks - first)
  block_at = (lambda i: first + count - 1 - i) if reverse else (lambda i: first + i)

  def carried_state():
    """The state at this chunk's start: the chunks walked before it, folded in walk order."""

    def fold(i, h):
      earlier = chunks.count - 1 - i if reverse else i
      decay = jnp.exp2(_rows(_load(totals_ref.at[sequence, earlier, channels], per_channel), h.shape) * a_log2)
      return decay * h + _load(ends_ref.at[sequence, earlier, channels, :], tile)

    return lax.fori_loop(0, chunks.count - 1 - chunk if reverse else chunk, fold, zeros)

  if chunks.ends:
    carry = (zeros, plgpu.layout_cast(jnp.zeros((block_d,), jnp.float32), per_channel))
  else:
    carry = carried_state() if chunks.count > 1 else zeros

  def walk_blocks(shared: dict):
    """The chunk in blocks of block_t positions; `shared` (SMEM) holds a block's step sizes and gates (C_t h_t with the
    epilogue), and B's and C's rows in float32, if given."""
    if shared:
      spread_bias, spread_skip = (
        lax.broadcast_in_dim(_load(ref.at[channels], _SPREAD.reduce(0)), (block_t, block_d), [1])
        for ref in (bias_ref, d_ref)
      )
      state_rows = plgpu.Layout.WG_STRIDED((block_t, state), vec_size=min(8, block_t * state // 128))

    # Zeros past the sequence's end still decay the state (their step size is softplus(bias) > 0). Walked last (not in
    # reverse) and the state kept, their step sizes are zeroed; walked first, they leave the zero state as it is.
    past_end = bool(block_t and length % block_t) and not reverse and last_state

    def block_body(start, *block_refs):
      *block_refs, carry = block_refs
      names = (*seq_names, "B") if chunks.ends else (*seq_names, "B", "C", "y")
      blocks = dict(zip(names, block_refs, strict=True))
      if shared:
        _block_barrier(inline)  # every thread is done with the last block's values
        step_size = _softplus(_load(blocks["delta"], _SPREAD) + spread_bias)
        shared["step_size"][...] = step_size
        if "step_u" in shared:
          shared["step_u"][...] = step_size * _load(blocks["u"], _SPREAD)
        if "gate" in shared:
          shared["gate"][...] = _gate(_load(blocks["z"], _SPREAD))
        for name in ("B", "C"):
          if name in shared:
            shared[name][...] = _load(blocks[name], state_rows)
        if "BC" in shared:
          pair = [plgpu.load(blocks[name], layout=state_rows, optimized=False) for name in ("B", "C")]
          shared["BC"][...] = _state_pairs(*pair)
        _block_barrier(inline)  # and sees every thread's values of this block

      def read(t):
        if shared:
          rows_at = lambda k: _load((shared if k in shared else blocks)[k].at[t], per_channel)  # noqa: E731
        else:
          rows_at = _raw_rows(lambda k: _load(blocks[k].at[t], per_channel), bias)
        if "BC" in shared:  # one load for both
          cols_at = _unpaired(plgpu.load(shared["BC"].at[t], layout=per_state, optimized=False)).__getitem__
        else:
          cols_at = lambda k: _load((shared if k in shared else blocks)[k].at[t], per_state)  # noqa: E731
        combined = _Combine(False, False) if epilogue else combine
        inputs = _inputs(rows_at, cols_at, combined, ends=chunks.ends, step_u="step_u" in shared)
        if past_end:  # (u is zero there, and so is step_u)
          inputs["step_size"] = inputs["step_size"] * jnp.clip(length - start - t, 0, 1).astype(jnp.float32)
        return inputs

      def write(positions, ys):
        if scatter_sums:  # positions in sequence order from the group's first (last if reverse), 4 at a time
          for i in range(0, len(ys), _SCATTERED):
            rows = pl.ds(positions[i + _SCATTERED - 1 if reverse else i], _SCATTERED)
            _store_scattered_sums(ys[i : i + _SCATTERED], shared["C_h"].at[rows], reverse=reverse, inline=inline)
          return
        for t, y in zip(positions, ys, strict=True):
          if epilogue:
            shared["C_h"][t] = y
          else:
            blocks["y"][t] = y.astype(blocks["y"].dtype)

      carry = _walk(read, update, write, block_t, carry, unroll, reverse)
      if epilogue:  # the block's y from its C_t h_t, each (position, channel) once
        _block_barrier(inline)
        spread = {name: _load(blocks[name], _SPREAD) for name in ("u", "partner", "z") if name in blocks}
        if "z" in spread:
          spread["gate"] = _gate(spread["z"])
        c_h = _load_c_h(shared["C_h"], (block_t, block_d), swizzled=scatter_sums and inline)
        y = _finish(c_h, spread, skip=spread_skip, combine=combine)
        blocks["y"][...] = y.astype(blocks["y"].dtype)
      return carry

    per_channel_refs = seq_refs | ({} if chunks.ends else {"y": y_ref})
    state_refs = [states[name] for name in state_names]
    if not staged:  # blocks read where they lie in HBM (what interpret mode runs; the length padded to whole blocks)

      def over_blocks(i, carry):
        at = pl.ds(block_at(i) * block_t, block_t)
        seq_views = [r.at[sequence, at, seq_channels.get(name, channels)] for name, r in per_channel_refs.items()]
        state_views = [states[name].at[sequence, at, columns[name]] for name in state_names]
        return block_body(
          block_at(i) * block_t, *seq_views[: len(seq_names)], *state_views, *seq_views[len(seq_names) :], carry
        )

      return lax.fori_loop(0, count, over_blocks, carry)

    # Blocks staged through shared memory by TMA, the next block's copy in flight.
    # With shared work, a tiling of 1 pins the blocks untiled: the spread loads would otherwise make Mosaic GPU tile
    # them by 8 positions, and their copies would then need a length that is a multiple of 8.
    untiled = (plgpu.TilingTransform((1,)),) if shared else ()
    seq_specs = [
      plgpu.BlockSpec((block_t, block_d), lambda i, first=first: (block_at(i), block + first), transforms=untiled)
      for first in (*seq_blocks, *[0] * (len(per_channel_refs) - len(seq_names)))
    ]
    state_specs = [  # B's or C's block of columns of its (length, width) array, read in place by TMA
      plgpu.BlockSpec((block_t, state), lambda i, index=column_block[name]: (block_at(i), index))
      for name in state_names
    ]
    pipeline = plgpu.emit_pipeline(
      lambda indices, *blocks: block_body(block_at(indices[0]) * block_t, *blocks),
      grid=(count,),
      in_specs=seq_specs[: len(seq_names)] + state_specs,
      out_specs=seq_specs[len(seq_names) :],
      max_concurrent_steps=stages,
      init_carry=carry,
    )
    outputs = [r for name, r in per_channel_refs.items() if name not in seq_refs]
    return pipeline(*(r.at[sequence] for r in (*seq_refs.values(), *state_refs, *outputs)))

  if share:  # the softplus and the gate of a whole block at once, each (position, channel) computed once
    names = ("step_size",) + ("step_u",) * share_step_u
    if epilogue or (combine.gated and not chunks.ends):  # C_t h_t for the epilogue, else the gate
      names += ("C_h",) if epilogue else ("gate",)
    scratch = [plgpu.SMEM((block_t, block_d), jnp.float32)] * len(names)
    if state_pairs and not chunks.ends:  # and B's and C's rows as one word per state
      names += ("BC",)
      scratch.append(plgpu.SMEM((block_t, state), jnp.uint32))
    elif f32_states or state_pairs:  # or in float32 (the ends launch's B alone, with state_pairs): converted once,
      # not by every channel's threads at every position
      names += state_names
      scratch += [plgpu.SMEM((block_t, state), jnp.float32)] * len(state_names)
    end = pl.run_scoped(lambda *scratch: walk_blocks(dict(zip(names, scratch, strict=True))), *scratch)
  else:
    end = walk_blocks({})
  if chunks.ends:
    h, total = end
    ends_ref[sequence, chunk, channels, :] = h
    totals_ref[sequence, chunk, channels] = total
  elif last_state and chunks.count == 1:
    last_ref[sequence, channels, :] = end
  elif last_state:  # by the program whose chunk is walked last

    @pl.when(chunk == (0 if reverse else chunks.count - 1))
    def _():
      last_ref[sequence, channels, :] = end


def forward(
  u,
  delta,
  A,
  B,
  C,
  D,
  z,
  delta_bias,
  *,
  block_d: int = 64,
  block_t: int = 0,
  unroll: int = 1,
  layout: str = "wgmma",
  share_channel_work: bool = False,
  share_step_u: bool = False,
  f32_states: bool = False,
  state_pairs: bool = False,
  epilogue: bool = False,
  scatter_sums: bool = False,
  staged: bool = True,
  stages: int = 2,
  reverse: bool = False,
  gated: bool = True,
  partner=None,
  y_over: str | None = None,
  chunks: int = 1,
  last_state: bool = False,
  auto_barriers: bool = False,
  interpret=False,
):
  """y of the selective scan with delta_softplus, for (batch, length, channels) inputs: averaged with `partner` (the
  other direction's y) if given, then gated by silu(z) if `gated`; with `last_state`, (y, the float32 state after the
  last position walked), as `selective_scan`'s return_last_state. B and C are (batch, length, state) arrays or
  `Columns` windows of a wider one, read in place where a window is a whole block of `state` columns; z likewise a
  (batch, length, channels) array or a window, read in place where it is whole blocks of `block_d` columns.

  `share_channel_work` computes each block's softplus and gate once per (position, channel) into shared memory
  (`block_t` a multiple of 32, `block_d` of 32); `share_step_u` (with the epilogue) also each block's step size times
  u, which the walk then reads instead of u and multiplies at no position; `f32_states` then also converts B's and C's
  rows to float32 there once, which every channel's threads otherwise do at every position. `state_pairs` (bf16 B and
  C) instead stores them there as one 32-bit word per state, which a thread reads for both in one load per position
  and unpacks with a shift and a mask: shared memory's wavefronts, not the arithmetic, bound the loop. `epilogue`
  (with shared work too) leaves each position's skip, combine and gate out of the walk, which then stores only C_t
  h_t, in float32 to shared memory: a pass over the block after it finishes y once per (position, channel), where the
  four threads of a channel in `quarter_rows` each do it at every position. `staged=False` reads the blocks from HBM
  without TMA (interpret mode), the sequences padded with zeros to whole blocks as TMA's copies read them; staged,
  `stages` blocks' copies are in flight at once (`emit_pipeline`'s max_concurrent_steps). `y_over` ("delta" or
  "partner") writes y over that input, as a mutable ref (`jax.new_ref`), which XLA aliases to the output: no new
  buffer where the input is not read again. `chunks` > 1 splits each sequence into that many chunks of whole blocks
  (`_Chunks`), for a GPU that too few sequences would leave idle: a launch for the chunks' end states, then one for y.
  `auto_barriers` puts back the warpgroup barriers Pallas inserts around every shared-memory store (the comment at
  `plgpu.kernel` says why they are left out)."""
  batch, length, channels = u.shape
  multiple = LAYOUTS[layout][1]
  if channels % block_d or block_d % multiple:
    raise ValueError(f"channels ({channels}) must be a multiple of block_d ({block_d}), itself of {multiple}")
  if _STATE_OF.get(layout, A.shape[1]) != A.shape[1]:
    raise ValueError(f"layout {layout!r} is written for state {_STATE_OF[layout]}, got A of shape {A.shape}")
  if share_channel_work and (block_t % 32 or not block_t or block_d % 32):
    raise ValueError(f"share_channel_work needs block_t ({block_t}) > 0 and it and block_d ({block_d}) multiples of 32")
  if (f32_states or state_pairs or epilogue) and not share_channel_work:
    raise ValueError(
      f"f32_states ({f32_states}), state_pairs ({state_pairs}) and epilogue ({epilogue}) need share_channel_work"
    )
  if share_step_u and not epilogue:
    raise ValueError(f"share_step_u needs the epilogue ({epilogue}), which adds the skip from u")
  if scatter_sums and (not epilogue or layout != "quarter_rows" or unroll % _SCATTERED or block_t % unroll):
    raise ValueError(
      f"scatter_sums needs the epilogue ({epilogue}), layout 'quarter_rows' ({layout!r}), unroll ({unroll}) a multiple"
      f" of {_SCATTERED} and block_t ({block_t}) one of unroll"
    )
  if state_pairs and (f32_states or B.dtype != jnp.bfloat16):
    raise ValueError(f"state_pairs takes bf16 B and C (got {B.dtype}) and replaces f32_states ({f32_states})")
  if stages < 1:
    raise ValueError(f"stages must be at least 1, got {stages}")
  (B, b_block), (C, c_block) = (_state_block(x, A.shape[1]) for x in (B, C))
  z, z_block = _channel_window(z, block_d) if gated else (None, 0)
  num_blocks = pl.cdiv(length, block_t) if block_t else 1
  if chunks < 1 or (chunks > 1 and not block_t):
    raise ValueError(f"chunks must be 1, or more with blocks (block_t > 0), got {chunks} with block_t {block_t}")
  seqs = dict(u=u, delta=delta) | (dict(z=z) if gated else {}) | ({} if partner is None else dict(partner=partner))
  if y_over not in (None, *seqs):
    raise ValueError(f"y_over must be None or one of {tuple(seqs)}, got {y_over!r}")
  if block_t and not staged and length % block_t:  # zeros past the end, as TMA's copies read there

    def pad(x):
      return jnp.pad(x, ((0, 0), (0, num_blocks * block_t - length), (0, 0)))

    seqs, B, C = {k: pad(v) for k, v in seqs.items()}, pad(B), pad(C)
  chunk_blocks = pl.cdiv(num_blocks, chunks)
  plan = _Chunks(count=pl.cdiv(num_blocks, chunk_blocks), blocks=chunk_blocks)

  def launch(seqs: dict, extra: tuple, plan: _Chunks, out_type, barriers: bool):
    chunk_programs = (plan.count - plan.ends,) if plan.count > 1 else ()
    kernel = plgpu.kernel(
      functools.partial(
        _forward_kernel,
        seq_names=tuple(seqs),
        seq_blocks=tuple(z_block if name == "z" else 0 for name in seqs),
        block_d=block_d,
        block_t=block_t,
        unroll=unroll,
        layout=layout,
        staged=staged,
        stages=stages,
        share=share_channel_work,
        share_step_u=share_step_u,
        f32_states=f32_states,
        state_pairs=state_pairs,
        epilogue=epilogue,
        scatter_sums=scatter_sums,
        inline=not interpret,
        state_columns=(b_block, c_block),
        reverse=reverse,
        combine=_Combine(gated=gated, partner=partner is not None),
        y_over=y_over,
        chunks=plan,
        last_state=last_state and not plan.ends,
        length=length,
      ),
      out_type=out_type,
      grid=(batch, channels // block_d, *chunk_programs),
      grid_names=("sequence", "block", "chunk")[: 2 + len(chunk_programs)],
      compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not barriers),
      interpret=interpret,
    )
    return kernel(*seqs.values(), B, C, A, D, delta_bias, *extra)

  extra = ()
  if plan.count > 1:  # the chunks' end states first; Pallas's barriers stay there: no y copy's commit precedes a refill
    shapes = [(batch, plan.count, channels, A.shape[1]), (batch, plan.count, channels)]
    ends_out = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    extra = launch(dict(u=seqs["u"], delta=seqs["delta"]), (), plan._replace(ends=True), ends_out, barriers=True)
  if y_over:
    seqs[y_over] = jax.new_ref(seqs[y_over].astype(u.dtype))
  # approx_math: ex2.approx, as the Triton kernels. Pallas puts a warpgroup barrier (bar.sync) before and after every
  # store to shared memory unless told not to: here two per position, around y's store into its output block, which
  # hold the four warps in lockstep and every load of the next positions behind them. None of them is needed: no
  # thread reads shared memory another thread wrote without an explicit barrier between. The block's softplus and
  # gate are read after the second `commit_smem` (a fence and a barrier), the epilogue's C_t h_t after its own, and
  # written again only after the next block's two; y's block is read by its TMA copy after the pipeline's
  # `commit_smem`; an input slot is refilled, and an output slot written again, only after that barrier and the
  # pipeline's wait on its earlier copy (a barrier follows it). Without them the loop over positions holds no barrier
  # (a test reads the lowered module), where it held eight per four positions. compute-sanitizer's racecheck agrees
  # (scan_racecheck_mosaic_no_barriers_h100.txt; with the epilogue and state_pairs,
  # racecheck_mosaic_state_pairs_h200.txt; with scatter_sums, whose stores go where the epilogue's do, before the
  # same barrier, racecheck_mosaic_scatter_sums_h100.txt).
  out_type = [] if y_over else [jax.ShapeDtypeStruct(seqs["u"].shape, u.dtype)]
  if last_state:
    out_type.append(jax.ShapeDtypeStruct((batch, channels, A.shape[1]), jnp.float32))
  outs = launch(seqs, extra, plan, tuple(out_type), barriers=auto_barriers)
  y = (jax.freeze(seqs[y_over]) if y_over else outs[0])[:, :length]
  return (y, outs[-1]) if last_state else y


_OPTION_NAMES = ("block_d", "block_t", "unroll", "layout", "share_channel_work", "share_step_u", "f32_states")
_OPTION_NAMES += ("state_pairs", "epilogue", "scatter_sums", "staged", "stages", "chunks", "auto_barriers", "interpret")


@functools.partial(jax.jit, static_argnames=("in_place", *_OPTION_NAMES))
def bidirectional(forward_args: tuple, backward_args: tuple, z, *, in_place: bool = False, **options) -> jax.Array:
  """Vim's (y_forward + y_backward) / 2 * silu(z) as two launches, as the Triton kernels do: the forward direction
  writes its ungated y, the backward one reads it and writes the combined output. `forward_args` and `backward_args`
  are (u, delta, A, B, C, D, delta_bias) as arrays (B and C may be `Columns`). `in_place` writes the first y over the
  forward direction's delta and the second over the first, as the Triton inference path does.

  Jitted, options static: a model's layers, which call it with the same shapes and options, share one traced jaxpr,
  which JAX lowers once. Pallas lowered the two kernels for each of Vim-Ti's 24 layers, 34 of the 43 s that lowering
  its 1248² forward took (2 CPU cores; the 24 layers' kernel modules were byte for byte the same). What the kernels
  read of this module is read when it is first traced for a shape: after patching any of it, `jax.clear_caches()`.

  `share_step_u` applies to the forward direction alone: the gated one's program (68 KiB of shared memory) would
  take 76 KiB with it, and then two fit a multiprocessor where Vim-Ti's 384 programs at batch 32 need three
  (experiments/checks/mosaic_shared_memory.py)."""
  y_forward = forward(
    *forward_args[:6], z, forward_args[6], gated=False, y_over="delta" if in_place else None, **options
  )
  return forward(
    *backward_args[:6],
    z,
    backward_args[6],
    reverse=True,
    partner=y_forward,
    y_over="partner" if in_place else None,
    **options | {"share_step_u": False},
  )


# What `pallas_gpu` runs (the fastest setting at 1248², batch 32 on an H200 and an H100) and where: sequences of
# at least FITS_LENGTH positions, bf16, state 16, on sm_90, in `chunks_to_fill` chunks. Without Pallas's barriers:
# racecheck found no hazard (H100, thirty-fourth session), and Vim-Ti's forward at 1248², batch 32 went from 58.8 to
# 53.5 ms with `f32_states` too (H100, ab_mosaic_options_vim_tiny_1248_h100.txt); with `epilogue` and unroll 8 it
# takes 51.8 against 53.6 (H100, ab_mosaic_epilogue_unroll8_vim_tiny_1248_h100.txt); `state_pairs` instead of
# `f32_states` takes it from 47.4 to 45.5 ms (H200, ab_mosaic_state_pairs_vim_tiny_1248_h200.txt; racecheck clean);
# `scatter_sums` from 49.6 to 49.0 ms (H100, ab_mosaic_scatter_sums_vim_tiny_1248_h100.txt; racecheck clean); unroll
# 16 instead of 8 from 47.10 to 46.36 ms (H100, ab_mosaic_unroll16_vim_tiny_h100.txt), 32 instead of 16 from 45.86 to
# 45.51 ms (H100, ab_mosaic_unroll32_vim_tiny_h100.txt; on the card it passed the check's every form, with the worst
# errors of 16: scan_gpu_check_mosaic_unroll32_partial_h100.txt, scan_gpu_check_mosaic_unroll32_case1_h100.txt,
# scan_gpu_check_mosaic_unroll32_case1_gated_h100.txt; memcheck_mosaic_forward_case0_chunks_h100.txt: 0 errors).
# `share_step_u` on both directions was slower (1.216 -> 1.273 ms at 1248², batch 32, H100, fifty-third session: the
# gated launch's program then fit two a multiprocessor); `bidirectional` gives it to the forward direction alone,
# which took Vim-Ti's forward from 45.55 to 45.19 ms at 1248², batch 32 and 31.18 to 31.00 at 1024² (both directions
# 1.220 -> 1.210 ms at 1248²; H100, fifty-fourth session, ab_mosaic_step_u_forward_direction_vim_tiny_h100.txt,
# scan_mosaic_gpu_forward_direction_h100.txt). That direction's third pipeline stage instead (`stages` 3, 69,656 B,
# still three programs a multiprocessor) took both directions to 1.207 ms but the forward only from 45.52 to 45.44
# and 31.10 to 31.06 (ab_mosaic_forward_stages_vim_tiny_h100.txt); with `share_step_u` too it holds 77,848 B, two fit,
# and both directions took 1.283 ms.
OPTIONS = dict(
  layout="quarter_rows",
  block_d=32,
  block_t=64,
  unroll=32,
  share_channel_work=True,
  share_step_u=True,
  state_pairs=True,
  epilogue=True,
  scatter_sums=True,
  in_place=True,
)
# A single direction (`pallas_gpu.scan` without gradients) runs the same kernel with y beside its inputs.
# Not `share_step_u`: gated (as `pallas_gpu.scan` calls it), its program would fit two a multiprocessor.
SINGLE_OPTIONS = {k: v for k, v in OPTIONS.items() if k not in ("in_place", "share_step_u")}
# From 730 positions (224², stride 8) on. Vim-Ti's forward, bf16, scanned layers, H100 (fits_length_ab.py, against
# 4096, thirty-eighth session): 28.33 -> 28.02 ms at 224², stride 8, batch 128; 52.02 -> 39.85 at 736², batch 64
# (2,117 positions); 38.62 -> 38.90 at 512², batch 128 (1,025), 0.7% slower; 25-29% less temporary memory at all
# three. At 224² (197 positions) the kernel is 15% slower than Triton's.
FITS_LENGTH = 730
# (sequence, channel block) programs that fill an H100 or H200: Vim-Ti at 1024² and 1248², batch 32, has 384.
FITS_PROGRAMS = 384


def fits(batch: int, length: int, channels: int, state: int, dtype, compute_capability: str | None) -> bool:
  """Whether `bidirectional` with OPTIONS is the measured faster forward for these shapes on this GPU (or within 1%,
  with a quarter less memory: FITS_LENGTH's comment)."""
  block_d = OPTIONS["block_d"]
  return (
    compute_capability == "9.0"
    and jnp.dtype(dtype) == jnp.bfloat16
    and state == _STATE_OF[OPTIONS["layout"]]
    and channels % block_d == 0
    and length >= FITS_LENGTH
  )


def chunks_to_fill(batch: int, channels: int) -> int:
  """Chunks per sequence that give at least FITS_PROGRAMS programs with OPTIONS: one for Vim-Ti at batch 32, 4 at
  batch 8, 32 for one image. One direction at 1248², H100: 0.29 ms at batch 8 against 0.37 unchunked and Triton's
  0.39; 0.10 at batch 1 against 0.38 and 0.14 (scan_mosaic_gpu_chunks_1248_b8_b1_h100.json)."""
  return -(-FITS_PROGRAMS // (batch * channels // OPTIONS["block_d"]))


def compute_capability() -> str | None:
  """The default device's compute capability ("9.0" on an H100 or H200), None off NVIDIA GPUs."""
  device = jax.devices()[0]
  return getattr(device, "compute_capability", None) if device.platform == "gpu" else None
