r"""The gradients of one ungated scan direction as one Pallas Mosaic GPU kernel for Hopper (experimental).

What Vim's training runs today is the Triton backward (`pallas_gpu`): a states pass that writes the state at every
second position (half of all states, to HBM and back) and a gradient kernel at ~235 registers. This kernel keeps
states off HBM but for one per block: each warpgroup owns one sequence and 32 channels (`quarter_rows`: a channel per
four threads, 4 states each) and walks the sequence twice.

1. In scan order from a zero state, storing the state that enters each block of `block_t` positions (float32,
   1/block_t of all states).
2. Blocks last first: the block's states recomputed from its entering state into registers, each position's decay
   exp(delta A) kept, then its positions walked backwards with the adjoint g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}:
   du, d(delta) (softplus's derivative applied), and per position dB and dC summed over the warpgroup's channels
   (partial sums per channel block, which XLA adds); dA, dD and d(delta_bias) summed over the sequence.

The ungated form is what Vim's fused bidirectional backward runs per direction (the gate's backward is XLA's,
`pallas_gpu.gate_backward`). Blocks are staged through shared memory by TMA (`emit_pipeline`), which reads zeros past
the sequence's end and drops writes there (dB's and dC's partial sums are whole blocks long, see `gradients`): u = 0
and dy = 0 keep those positions out of every gradient (forward, the adjoint is zero there; in reverse, walked first,
the state is). Interpret mode cannot run the staged copies, so there (`staged=False`) the blocks are views of HBM and
the sequences are padded with zeros to whole blocks.

Checked in interpret mode against the float64 reference and lowered for CUDA at Vim-Ti's shapes. On an H100 (jax
0.11.2, fifty-first session) every gradient is within Triton's error of XLA's scan, both directions: at lengths 100 and
197 (a probe whose cases `scan_gpu_check.py --mosaic_backward` now runs) and at 224², batch 128
(`scan_mosaic_backward.py`). It is no faster than the Triton backward there: 0.438 against 0.409 ms
(`experiments/results/scan_mosaic_backward_224_b128_first_h100.json`, before the fixes to dB's and dC's rows and the
first walk's barrier). By ncu the kernel alone takes 387 us at 158 registers a thread (3 warpgroups a multiprocessor),
issuing in 59% of cycles: ~190 instructions a position per warp, 39 in the first walk and 152 in the second. The
register-saving options tried in the fifty-second session were right on the card but left ptxas at 148-167 registers
and the backward at 0.430 ms at best (`scan_mosaic_backward_224_b128_candidates_h100.json`): Mosaic GPU marks every
kernel `nvvm.minctasm` 1 and exposes no register cap, so ptxas takes what it likes. Those that lost were removed:
recomputing the decays for the walk back (no fewer registers), the states in shared memory rather than registers
(0.451 against 0.430 ms) and dB's and dC's products summed over the channels in shared memory once per block rather
than by shuffles (0.449-0.470). So `pallas_gpu.MOSAIC_BACKWARD`, which runs it in Vim's fused
bidirectional backward, stays off.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref, vector

from kernels.selective_scan.mosaic_gpu import LAYOUTS, _block_barrier, _cols, _load, _rows, _softplus
from kernels.selective_scan.softplus import softplus_grad

LAYOUT = "quarter_rows"
BLOCK_D = LAYOUTS[LAYOUT][1]  # channels per warpgroup
STATE = 16  # the state size `quarter_rows` is written for
# The blocks' widths of the arrays that are (batch, length, a few states); the others are (batch, length, channels).
_STATE_WIDTHS = {"B": STATE, "C": STATE, "dBC": 2 * STATE}


class Gradients(NamedTuple):
  """Of `gradients`'s arguments, each in its argument's dtype."""

  u: jax.Array
  delta: jax.Array
  A: jax.Array
  B: jax.Array
  C: jax.Array
  D: jax.Array
  delta_bias: jax.Array


# `quarter_rows`, as `_tiled` builds it: lane = 4 x (channel mod 8) + the channel's quarter of the state, warp = channel
# // 8. So a warp's 8 channels of one quarter are the lanes 4 apart, whose bits 4, 8, 16 are the channel's 1, 2, 4.
_WARPS = 4
_CHANNELS_PER_WARP = BLOCK_D // _WARPS
_CHANNEL_BITS = ((4, 16), (2, 8), (1, 4))  # (a channel bit, the lane distance that flips it), highest first


def _store_warp_sums(products: tuple, partials_ref, t: int) -> None:
  """partials_ref[warp, t, kind * 16 + n] = the sum over the warp's 8 channels of products[kind][:, n], for the two
  (32, 16) products in `quarter_rows` whose sums over the channels are dB_t and dC_t.

  A reduce-scatter, as `mosaic_gpu._store_scattered_sums` does over a channel's states: each thread has 8 values (its
  4 states of both products); three rounds of butterfly shuffles (4, 2, then 1 value sent) leave each of the 8 lanes of
  a quarter one of them summed over the warp's channels, 7 shuffles where a sum per value takes 24. A warp's 32 lanes
  then store 32 consecutive floats (one wavefront), and `_sum_over_warps` adds the 4 warps' rows once per block,
  where Pallas's reduction over the channels exchanges them through shared memory, between two warpgroup barriers, at
  every position."""
  layout = LAYOUTS[LAYOUT][0]

  @plgpu.inline_mgpu(arg_types=((layout, layout), plgpu.RefType()))
  def store(ctx, arrays, ref):
    del ctx
    index = ir.IndexType.get()
    constant = functools.partial(mgpu_utils.c, ty=index)
    ((channel, first_state),) = arrays[0].layout.thread_idxs(arrays[0].shape)  # one register: a channel's 4 states
    values = []
    for array in arrays:
      (register,) = array.registers.flat
      (size,) = ir.VectorType(register.type).shape
      at = [ir.DenseI64ArrayAttr.get([i]) for i in range(size)]
      values += [vector.extract(register, dynamic_position=[], static_position=i) for i in at]
    offset = first_state
    for bit, lanes in _CHANNEL_BITS:
      high = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(channel, constant(bit)), constant(0))
      half = len(values) // 2
      kept = [arith.select(high, values[half + i], values[i]) for i in range(half)]
      sent = [arith.select(high, values[i], values[half + i]) for i in range(half)]
      values = [arith.addf(k, mgpu_utils.shfl_bfly(v, lanes)) for k, v in zip(kept, sent, strict=True)]
      # The kept half's place among the 8: the kind (16 columns apart) for the first bit, then states.
      offset = arith.addi(offset, arith.select(high, constant(STATE if bit == 4 else half), constant(0)))
    (total,) = values
    warp = arith.divui(channel, constant(_CHANNELS_PER_WARP))
    memref.store(total, ref, [warp, constant(t), offset])

  store(tuple(products), partials_ref)


def _sum_over_warps(partials_ref, out_ref, block_t: int) -> None:
  """out_ref[...] = the block's (block_t, 2 x 16) dB_t and dC_t rows of this program's channels, from
  `_store_warp_sums`'s."""
  rows = plgpu.Layout.WG_STRIDED((block_t, 2 * STATE), vec_size=max(1, block_t * 2 * STATE // 128))
  out_ref[...] = functools.reduce(lambda a, b: a + b, (_load(partials_ref.at[w], rows) for w in range(_WARPS)))


CHANNEL_SUMS = ("shuffles", "pallas")  # `gradients`'s ways to sum dB and dC over the channels


def _softplus_grad(x: jax.Array) -> jax.Array:
  """`softplus_grad` with the sigmoid written out, in what Mosaic GPU lowers."""
  return softplus_grad(x, lambda v: 1.0 / (1.0 + jnp.exp(-v)))


def _kernel(
  u_ref,
  delta_ref,
  dy_ref,
  b_ref,
  c_ref,
  a_ref,
  d_ref,
  bias_ref,
  du_ref,
  ddelta_ref,
  dbc_ref,
  da_ref,
  dd_ref,
  dbias_ref,
  states_ref,
  *,
  block_t: int,
  reverse: bool,
  staged: bool,
  channel_sums: str,
  shared_steps: bool,
  shared_bc: bool,
  keep_steps: bool,
  inline: bool,
):
  """refs: u, delta, dy (batch, length, channels); B, C (batch, length, state); A, D, delta_bias; then the outputs
  du, d(delta) like u; dB's and dC's partial sums side by side (batch, channel blocks, length, 2 x state); dA's, dD's
  and d(delta_bias)'s per sequence (batch, channels[, state]); the entering states (batch, blocks, channels, state),
  the kernel's own.

  `channel_sums` names how dB and dC are summed over the channels: "shuffles" (`_store_warp_sums`), or "pallas" and
  wherever not `inline` (interpret mode, which cannot run that Mosaic GPU code), Pallas's reductions. `shared_steps`
  computes each block's step sizes and softplus's derivative once per (position, channel) into shared memory
  (`share_block`), where a channel's four threads would each compute them, in both walks. `shared_bc` converts each
  block's B and C to float32 there once: read as bf16, every thread converts 4 entries of each at every position, ~12
  of the second walk's ~150 instructions a position per warp (its SASS; H100 ptxas). `keep_steps` keeps each
  position's u, step size and softplus derivative in registers from the second walk's recomputation to its walk back;
  else the walk back reads them again (3 x block_t registers fewer by count: at 158 a thread, 3 warpgroups share a
  multiprocessor, and the kernel waits on latency there; it issues in 59% of cycles, H100)."""
  tile = LAYOUTS[LAYOUT][0]
  per_channel, per_state = tile.reduce(1), tile.reduce(0)
  shape = (BLOCK_D, STATE)
  sequence, block = lax.axis_index("sequence"), lax.axis_index("block")
  channels = pl.ds(block * BLOCK_D, BLOCK_D)
  A = _load(a_ref.at[channels, :], tile)
  a_log2 = A * math.log2(math.e)
  skip, bias = _load(d_ref.at[channels], per_channel), _load(bias_ref.at[channels], per_channel)
  num_blocks = states_ref.shape[1]
  spread = plgpu.Layout.WG_STRIDED((block_t, BLOCK_D), vec_size=max(1, block_t * BLOCK_D // 128))
  state_spread = plgpu.Layout.WG_STRIDED((block_t, STATE), vec_size=max(1, block_t * STATE // 128))
  position = (lambda k: block_t - 1 - k) if reverse else (lambda k: k)  # of a block's k-th step in scan order
  scan_block = (lambda i: num_blocks - 1 - i) if reverse else (lambda i: i)  # the block walked i-th
  entering = states_ref.at[sequence]

  def read(blocks: dict, k: int, scratch: dict) -> dict:
    """Position k's per-channel inputs: its step size (softplus of delta + bias) and softplus's derivative there,
    from the block's shared ones (`share_block`) or computed in every thread of the channel."""
    t = position(k)
    u = _load(blocks["u"].at[t], per_channel)
    if "step" in scratch:
      shared = {name: _load(scratch[name].at[t], per_channel) for name in ("step", "dstep") if name in scratch}
      return dict(t=t, u=u, **shared)
    x = _load(blocks["delta"].at[t], per_channel) + bias
    return dict(t=t, u=u, step=_softplus(x), dstep=_softplus_grad(x))

  def share_block(blocks: dict, scratch: dict, *, derivative: bool) -> None:
    """The block's step sizes (and softplus's derivative), and its B and C in float32, into shared memory: each
    (position, channel) computed and each entry converted once (`shared_steps`, `shared_bc`)."""
    converted = [name for name in ("B", "C") if name in scratch and name in blocks]
    if "step" not in scratch and not converted:
      return
    _block_barrier(inline)  # every thread has read the last block's
    if "step" in scratch:
      x = _load(blocks["delta"], spread) + _load(scratch["bias"], spread)
      scratch["step"][...] = _softplus(x)
      if derivative:
        scratch["dstep"][...] = _softplus_grad(x)
    for name in converted:
      scratch[name][...] = _load(blocks[name], state_spread)
    _block_barrier(inline)  # and sees every thread's of this block

  def state_row(blocks: dict, scratch: dict, name: str, t: int):
    """B_t or C_t across the tile's states, from the block's float32 copy (`shared_bc`) or converted here."""
    return _load((scratch[name] if name in scratch else blocks[name]).at[t], per_state)

  def advance(h, p: dict, blocks: dict, scratch: dict):
    """(exp(delta_t A), h_t) from h_{t-1}."""
    decay = jnp.exp2(_rows(p["step"], shape) * a_log2)
    B = state_row(blocks, scratch, "B", p["t"])
    return decay, decay * h + _rows(p["step"] * p["u"], shape) * _cols(B, shape)

  def store_entering(b, blocks: dict, h, scratch: dict):
    entering[b, channels, :] = h
    share_block(blocks, scratch, derivative=False)
    for k in range(block_t):
      _, h = advance(h, read(blocks, k, scratch), blocks, scratch)
    # Every thread has read the block before the pipeline refills its slot: this walk has no outputs, so no commit
    # (and its barrier) comes between the body and the next copy, which one thread issues.
    _block_barrier(inline)
    return h

  def block_gradients(b, blocks: dict, carry, scratch: dict):
    shuffled = "sums" in scratch
    if shuffled:
      _block_barrier(True)  # every thread has read the last block's partial sums
    share_block(blocks, scratch, derivative=True)
    g, dA, dD, dbias = carry  # g: exp(delta_{t+1} A) g_{t+1}, the adjoint that later positions pass back
    kept = [read(blocks, k, scratch) for k in range(block_t)] if keep_steps else None
    step_at = (lambda k: kept[k]) if keep_steps else (lambda k: read(blocks, k, scratch))  # noqa: E731
    # states[k]: the state before the block's k-th step; decays[k]: exp(delta A) at that step.
    h = _load(entering.at[b, channels, :], tile)
    states, decays = [h], []
    for k in range(block_t):
      decay, h = advance(h, step_at(k), blocks, scratch)
      decays.append(decay)
      states.append(h)
    after = h  # the state after the walk back's position
    for k in reversed(range(block_t)):
      p = step_at(k)
      t, decay, before = p["t"], decays[k], states[k]
      dy = _load(blocks["dy"].at[t], per_channel)
      B, C = (state_row(blocks, scratch, name, t) for name in ("B", "C"))
      g = _rows(dy, shape) * _cols(C, shape) + g
      g_b = (g * _cols(B, shape)).sum(axis=1)
      decayed = g * decay * before  # g_t exp(delta_t A) h_{t-1}: dL/d(delta_t A)
      ddelta = (p["u"] * g_b + (decayed * A).sum(axis=1)) * p["dstep"]
      blocks["du"][t] = (p["step"] * g_b + skip * dy).astype(blocks["du"].dtype)
      blocks["ddelta"][t] = ddelta.astype(blocks["ddelta"].dtype)
      products = (g * _rows(p["step"] * p["u"], shape), _rows(dy, shape) * after)  # summed: dB_t, dC_t
      if shuffled:
        _store_warp_sums(products, scratch["sums"], t)
      else:
        for i, product in enumerate(products):
          blocks["dBC"][t, pl.ds(i * STATE, STATE)] = product.sum(axis=0)
      dA, dD, dbias = dA + decayed * _rows(p["step"], shape), dD + dy * p["u"], dbias + ddelta
      g, after = decay * g, before
    if shuffled:
      _block_barrier(True)  # and every thread has stored its own
      _sum_over_warps(scratch["sums"], blocks["dBC"], block_t)
    return g, dA, dD, dbias

  zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), tile)
  channel_zeros = plgpu.layout_cast(jnp.zeros((BLOCK_D,), jnp.float32), per_channel)
  seq_refs = dict(u=u_ref, delta=delta_ref, dy=dy_ref, B=b_ref, C=c_ref)
  out_refs = dict(du=du_ref, ddelta=ddelta_ref, dBC=dbc_ref.at[:, block])
  first_pass, second_pass = ("u", "delta", "B"), ("u", "delta", "dy", "B", "C")

  def walk(body, names, outputs, block_at, carry):
    """body(b, blocks, carry) over the blocks in the order block_at(i), blocks named by `names` (inputs) and
    `outputs`, each this program's (block_t, channels) or (block_t, state) window."""
    refs = [seq_refs[n] for n in names] + [out_refs[n] for n in outputs]

    def window(n):
      return slice(None) if n in _STATE_WIDTHS else channels

    if not staged:

      def over_blocks(i, carry):
        rows = pl.ds(block_at(i) * block_t, block_t)
        blocks = {n: r.at[sequence, rows, window(n)] for n, r in zip((*names, *outputs), refs, strict=True)}
        return body(block_at(i), blocks, carry)

      return lax.fori_loop(0, num_blocks, over_blocks, carry)

    def spec(n):
      if n in _STATE_WIDTHS:
        return plgpu.BlockSpec((block_t, _STATE_WIDTHS[n]), lambda i: (block_at(i), 0))
      return plgpu.BlockSpec((block_t, BLOCK_D), lambda i: (block_at(i), block))

    pipeline = plgpu.emit_pipeline(
      lambda indices, *blocks: body(
        block_at(indices[0]), dict(zip((*names, *outputs), blocks[:-1], strict=True)), blocks[-1]
      ),
      grid=(num_blocks,),
      in_specs=[spec(n) for n in names],
      out_specs=[spec(n) for n in outputs],
      init_carry=carry,
    )
    return pipeline(*(r.at[sequence] for r in refs))

  def both_walks(scratch: dict):
    if "bias" in scratch:  # delta_bias in every row of a block, for `share_block`
      for t in range(block_t):
        scratch["bias"][t] = bias
    walk(functools.partial(store_entering, scratch=scratch), first_pass, (), scan_block, zeros)
    init = (zeros, zeros, channel_zeros, channel_zeros)
    backwards = lambda i: scan_block(num_blocks - 1 - i)  # noqa: E731
    body = functools.partial(block_gradients, scratch=scratch)
    return walk(body, second_pass, ("du", "ddelta", "dBC"), backwards, init)

  scratch = {}
  if channel_sums == "shuffles" and inline:
    scratch["sums"] = plgpu.SMEM((_WARPS, block_t, 2 * STATE), jnp.float32)
  if shared_steps:
    scratch |= {name: plgpu.SMEM((block_t, BLOCK_D), jnp.float32) for name in ("bias", "step", "dstep")}
  if shared_bc:
    scratch |= {name: plgpu.SMEM((block_t, STATE), jnp.float32) for name in ("B", "C")}
  names = tuple(scratch)
  _, dA, dD, dbias = pl.run_scoped(lambda *refs: both_walks(dict(zip(names, refs, strict=True))), *scratch.values())
  da_ref[sequence, channels, :] = dA
  dd_ref[sequence, channels] = dD
  dbias_ref[sequence, channels] = dbias


@functools.partial(
  jax.jit,
  static_argnames=(
    "reverse",
    "block_t",
    "staged",
    "channel_sums",
    "shared_steps",
    "shared_bc",
    "keep_steps",
    "auto_barriers",
    "interpret",
  ),
)
def gradients(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array,
  delta_bias: jax.Array,
  dy: jax.Array,
  *,
  reverse: bool = False,
  block_t: int = 8,
  staged: bool = True,
  channel_sums: str = "shuffles",
  shared_steps: bool = True,
  shared_bc: bool = False,
  keep_steps: bool = True,
  auto_barriers: bool = False,
  interpret=False,
) -> Gradients:
  """The gradients of y = selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True,
  reverse=reverse) (no z) against the cotangent dy, for (batch, length, channels) sequences and (batch, length, 16)
  B and C. `staged=False` reads the blocks in place from HBM (what interpret mode runs); `channel_sums` ("pallas" or
  "shuffles"), `shared_steps`, `shared_bc` and `keep_steps` are `_kernel`'s; `auto_barriers` puts
  back the warpgroup barriers Pallas puts around every store to shared memory. None is needed, as in the forward
  (`mosaic_gpu.forward`'s comment): threads write output blocks that only their TMA copies read, after the pipeline's
  fence and barrier, and the shared step sizes, B and C and the sums over channels are fenced by their own
  barriers."""
  batch, length, channels = u.shape
  if channels % BLOCK_D:
    raise ValueError(f"channels (u.shape[-1] = {channels}) must be a multiple of {BLOCK_D}")
  if A.shape != (channels, STATE):
    raise ValueError(f"A must have shape (channels, {STATE}) = {(channels, STATE)}, got {A.shape}")
  if block_t < 1 or block_t % 4:
    # A block's (block_t, 32) step sizes and sums over the channels are spread over the warpgroup's 128 threads.
    raise ValueError(f"block_t must be a positive multiple of 4, got {block_t}")
  if channel_sums not in CHANNEL_SUMS:
    raise ValueError(f"channel_sums must be one of {CHANNEL_SUMS}, got {channel_sums!r}")
  if shared_bc and block_t % 8:
    # And a block's (block_t, 16) B and C.
    raise ValueError(f"block_t must be a multiple of 8 with shared_bc, got {block_t}")
  num_blocks = pl.cdiv(length, block_t)
  seqs = [u, delta, dy, B, C]
  padded = length if staged else num_blocks * block_t
  if padded != length:  # zeros past the end, as TMA's copies read there
    seqs = [jnp.pad(x, ((0, 0), (0, padded - length), (0, 0))) for x in seqs]
  f32 = jnp.float32
  channel_blocks = channels // BLOCK_D
  out_type = (
    jax.ShapeDtypeStruct((batch, padded, channels), u.dtype),
    jax.ShapeDtypeStruct((batch, padded, channels), delta.dtype),
    # Whole blocks, staged or not: TMA's store of a last block past the end of one channel block's window of this
    # array wrote its rows at the start of the next window's (H100, fifty-first session: reverse, length 100, block 8).
    jax.ShapeDtypeStruct((batch, channel_blocks, num_blocks * block_t, 2 * STATE), f32),
    jax.ShapeDtypeStruct((batch, channels, STATE), f32),
    jax.ShapeDtypeStruct((batch, channels), f32),
    jax.ShapeDtypeStruct((batch, channels), f32),
    jax.ShapeDtypeStruct((batch, num_blocks, channels, STATE), f32),
  )
  kernel = plgpu.kernel(
    functools.partial(
      _kernel,
      block_t=block_t,
      reverse=reverse,
      staged=staged,
      channel_sums=channel_sums,
      shared_steps=shared_steps,
      shared_bc=shared_bc,
      keep_steps=keep_steps,
      inline=not interpret,
    ),
    out_type=out_type,
    grid=(batch, channel_blocks),
    grid_names=("sequence", "block"),
    kernel_name="selective_scan_mosaic_backward",  # for profilers' filters (`ncu -k regex:selective_scan`)
    # ex2.approx, as the forward kernels
    compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not auto_barriers),
    interpret=interpret,
  )
  du, ddelta, dbc, da, dd, dbias, _ = kernel(*seqs, A.astype(f32), D.astype(f32), delta_bias.astype(f32))
  dbc = dbc[:, :, :length].sum(axis=1)  # then split: summed apart, the halves took two passes (9.8 and 9.7 us, H100)
  return Gradients(
    du[:, :length],
    ddelta[:, :length],
    da.sum(axis=0).astype(A.dtype),
    dbc[..., :STATE].astype(B.dtype),
    dbc[..., STATE:].astype(C.dtype),
    dd.sum(axis=0).astype(D.dtype),
    dbias.sum(axis=0).astype(delta_bias.dtype),
  )
