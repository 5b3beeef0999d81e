"""Selective scan as Pallas Mosaic TPU kernels, forward and backward, bound with `jax.custom_vjp`.

Layout. Channels sit on the 128-wide lane axis and the state on sublanes: a block's state is a
(state, block_d) array, two vregs per 128 channels at Vim's state 16, so one step of the recurrence is
a few full-width vector ops. Channels are zero-padded to a multiple of the block (itself a multiple of
128) and the state to a multiple of 8 (the f32 sublane tile); A = B = C = 0 there keeps padded state
entries at 0 and out of every output.

Grid (batch, channel blocks, chunks) with semantics ("parallel", "parallel", "arbitrary"): each step
owns `chunk` positions of one sequence's channel block and walks them one at a time, carrying the state
from chunk to chunk in a VMEM scratch, so the (batch, length, channels, state) states never reach HBM.
The length is zero-padded to a whole number of equal chunks (a multiple of 8 positions): padding
positions (delta = 0, u = 0) are identity steps, after the last position forward, and met while the
state is still 0 in reverse. `reverse` needs no flipped copies in HBM: the index maps walk the chunks
from last to first and the kernel walks positions from last to first inside each chunk.

B_t and C_t arrive as (1, state) rows (state on lanes) but multiply the state as (state, 1) columns;
a row becomes a column by selecting it onto the diagonal of a (state, state) tile and summing over
lanes (and back for dB and dC): exact, and only selects and reductions, no lane-sublane reshape or
transpose. Reductions are multiplies and sums, not dots: a dot may run at bf16
precision on the MXU.

Backward. The forward pass also writes the state entering each chunk, so the residuals are the inputs
plus (batch, chunks, state, channels) floats. The backward kernel walks the chunks in the opposite
order; for each it recomputes the chunk's states from its start state into a (chunk, state, block_d)
VMEM scratch, then runs the adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1} (g starts from the
h_last cotangent) backwards through the chunk, carrying g across chunks in VMEM. dB and dC are sums over
channels and dA over batch and length: the kernel writes per-channel-block and per-(sequence, block)
partials, summed in XLA.

float32 only on TPU: Mosaic has no float64 vector ops. `interpret=True` runs the kernels on CPU, in
TPU interpret mode for float32 on one device and in the generic Pallas interpreter otherwise (other dtypes,
float64 included, and over several devices; see `_interpret_params`). Checked in interpret mode and by
lowering for TPU on a CPU host; not yet compiled by Mosaic or run on a TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.selective_scan.padding import pad_to

# Untuned (no TPU measurement yet). Channel blocks of up to 384 lanes: every Vim width (384, 768, 1536)
# splits into 384-wide blocks with no padding, the (state, block_d) state is 6 vregs at state 16, and the
# per-step row-to-column conversions of B and C are shared by 3 lane tiles. Chunks of up to 128
# positions: the backward scratch is then 3 MiB at state 16 x 384 channels (about 6 MiB of VMEM with the
# double-buffered blocks, under the 16 MiB default scoped limit of v5e), the saved chunk-start states 1/8
# of y's size at state 16, and a grid step's work (128 sequential steps) dwarfs its ~0.35 us overhead.
MAX_BLOCK_D = 384
MAX_CHUNK = 128
# Divides every chunk; lets the scheduler overlap the next steps' loads and exps with the current update.
UNROLL = 8

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _column(row: jax.Array, eye: jax.Array) -> jax.Array:
  """(1, n) -> (n, 1): selects the row onto the diagonal and sums over lanes (exact)."""
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _row(column: jax.Array, eye: jax.Array) -> jax.Array:
  """(n, 1) -> (1, n): selects the column onto the diagonal and sums over sublanes (exact)."""
  return jnp.sum(jnp.where(eye, column, 0.0), axis=0, keepdims=True)


def _eye(n: int) -> jax.Array:
  """The (n, n) diagonal mask, built in the kernel (a pallas_call cannot capture array constants)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  return rows == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)


def _step_inputs(t, u_ref, delta_ref, B_ref, A_t, eye):
  """Position t's delta and u rows (1, block_d), its B column (state, 1) and the step h -> decay * h +
  drive, both (state, block_d)."""
  delta = delta_ref[pl.ds(t, 1), :]
  u = u_ref[pl.ds(t, 1), :]
  B = _column(B_ref[pl.ds(t, 1), :], eye)
  return delta, u, B, jnp.exp(delta * A_t), B * (delta * u)


def _forward_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, y_ref, h_last_ref, *refs, chunk, reverse, save_starts):
  """One (sequence, channel block, chunk): u/delta/y (chunk, block_d), A^T (state, block_d), B/C
  (chunk, state), h_last and the optional chunk-start state (state, block_d); scratch: the state."""
  *start_ref, h_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    h_ref[...] = jnp.zeros_like(h_ref)

  if save_starts:
    start_ref[0][...] = h_ref[...]
  A_t, eye = A_ref[...], _eye(B_ref.shape[1])

  def step(i, h):
    t = chunk - 1 - i if reverse else i
    *_, decay, drive = _step_inputs(t, u_ref, delta_ref, B_ref, A_t, eye)
    h = decay * h + drive
    y_ref[pl.ds(t, 1), :] = jnp.sum(h * _column(C_ref[pl.ds(t, 1), :], eye), axis=0, keepdims=True)
    return h

  h = jax.lax.fori_loop(0, chunk, step, h_ref[...], unroll=UNROLL)
  h_ref[...] = h

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    h_last_ref[...] = h


def _backward_kernel(
  u_ref, delta_ref, A_ref, B_ref, C_ref, start_ref, dy_ref, dh_last_ref,
  du_ref, ddelta_ref, dB_ref, dC_ref, dA_ref,
  hs_ref, g_ref, dA_acc_ref,
  *, chunk, reverse,
):  # fmt: skip
  """One (sequence, channel block, chunk), chunks in reverse scan order: inputs as in the forward kernel
  plus the chunk-start state, dy (chunk, block_d) and the h_last cotangent; outputs du/ddelta (chunk,
  block_d), this block's dB/dC partials (chunk, state) and, at the end, its dA partial (state, block_d).
  Scratch: the chunk's states (chunk, state, block_d), the adjoint carry and the dA sum."""
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    g_ref[...] = dh_last_ref[...]
    dA_acc_ref[...] = jnp.zeros_like(dA_acc_ref)

  A_t, eye = A_ref[...], _eye(B_ref.shape[1])
  position = (lambda i: chunk - 1 - i) if reverse else (lambda i: i)  # i counts steps in scan order

  def recompute(i, h):
    hs_ref[i] = h  # the state before step i
    *_, decay, drive = _step_inputs(position(i), u_ref, delta_ref, B_ref, A_t, eye)
    return decay * h + drive

  jax.lax.fori_loop(0, chunk, recompute, start_ref[...], unroll=UNROLL)

  def adjoint(j, carry):
    g_later, dA = carry  # a_{t+1} g_{t+1} (the h_last cotangent after the last step), sum of dA terms
    i = chunk - 1 - j
    t = position(i)
    delta, u, B, decay, drive = _step_inputs(t, u_ref, delta_ref, B_ref, A_t, eye)
    h_prev = hs_ref[i]
    h = decay * h_prev + drive
    dy = dy_ref[pl.ds(t, 1), :]
    g = dy * _column(C_ref[pl.ds(t, 1), :], eye) + g_later  # dL/dh_t
    dC_ref[pl.ds(t, 1), :] = _row(jnp.sum(h * dy, axis=1, keepdims=True), eye)
    dB_ref[pl.ds(t, 1), :] = _row(jnp.sum(g * (delta * u), axis=1, keepdims=True), eye)
    g_B = jnp.sum(g * B, axis=0, keepdims=True)
    du_ref[pl.ds(t, 1), :] = delta * g_B
    g_decay_h = g * decay * h_prev  # dL/d(delta_t A) elementwise
    ddelta_ref[pl.ds(t, 1), :] = u * g_B + jnp.sum(g_decay_h * A_t, axis=0, keepdims=True)
    return decay * g, dA + g_decay_h * delta

  g, dA = jax.lax.fori_loop(0, chunk, adjoint, (g_ref[...], dA_acc_ref[...]), unroll=UNROLL)
  g_ref[...] = g
  dA_acc_ref[...] = dA

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    dA_ref[...] = dA


def _interpret_params(interpret: bool, dtype) -> pltpu.InterpretParams | bool:
  """Interpret mode for `dtype`: TPU interpret mode for float32 on one device, as it simulates VMEM and the grid
  (uninitialised scratch reads as NaN, the parallel axes run shuffled), so it catches more; the generic
  interpreter otherwise. The TPU one's callbacks run outside a `jax.enable_x64` context and fail on float64 (jax
  0.12). Over several devices (in `shard_map`) it starts every kernel with a barrier across them, in a host
  callback, which XLA's CPU collectives can deadlock: a device that reaches an independent all-reduce first waits
  there for one that waits at the barrier for it, until XLA's collective timeout aborts the process (once in CI, in
  a test under an 8-device mesh)."""
  if not interpret:
    return False
  one_device = jax.sharding.get_abstract_mesh().size <= 1
  return pltpu.InterpretParams() if dtype == jnp.float32 and one_device else True


class _Plan:
  """Block sizes, padded sizes and block specs of one call, from the shapes and options."""

  def __init__(self, u: jax.Array, A: jax.Array, *, max_chunk: int, max_block_d: int):
    batch, length, channels = u.shape
    tiles = pl.cdiv(channels, 128)
    # The widest block of whole lane tiles, within max_block_d, that divides the 128-aligned channels.
    self.block_d = 128 * max(n for n in range(1, max(max_block_d // 128, 1) + 1) if tiles % n == 0)
    self.channels = 128 * tiles
    self.state = pl.cdiv(A.shape[1], 8) * 8
    self.num_chunks = pl.cdiv(length, max_chunk)
    self.chunk = pl.cdiv(pl.cdiv(length, self.num_chunks), 8) * 8  # equal chunks of whole sublane tiles
    self.length = self.num_chunks * self.chunk
    self.grid = (batch, self.channels // self.block_d, self.num_chunks)

  def pad(self, u, delta, A, B, C):
    """The inputs zero-padded to the plan's sizes, A transposed to (state, channels)."""
    u, delta = (pad_to(pad_to(x, 2, self.channels), 1, self.length) for x in (u, delta))
    B, C = (pad_to(pad_to(x, 2, self.state), 1, self.length) for x in (B, C))
    return u, delta, pad_to(pad_to(A.T, 0, self.state), 1, self.channels), B, C

  def specs(self, *, from_last_chunk: bool) -> dict[str, pl.BlockSpec]:
    """BlockSpecs by kind of array, for a grid that visits the chunks from the first or the last."""
    last = self.num_chunks - 1
    chunk_of = (lambda k: last - k) if from_last_chunk else (lambda k: k)
    s, d, c = self.state, self.block_d, self.chunk
    return {
      "seq": pl.BlockSpec((None, c, d), lambda b, j, k: (b, chunk_of(k), j)),  # (batch, length, channels)
      "A": pl.BlockSpec((s, d), lambda b, j, k: (0, j)),  # A^T (state, channels)
      "bc": pl.BlockSpec((None, c, s), lambda b, j, k: (b, chunk_of(k), 0)),  # (batch, length, state)
      # Per channel block: (batch, channel blocks, length, state).
      "bc_partial": pl.BlockSpec((None, None, c, s), lambda b, j, k: (b, j, chunk_of(k), 0)),
      # Per chunk: (batch, chunks, state, channels).
      "chunk_state": pl.BlockSpec((None, None, s, d), lambda b, j, k: (b, chunk_of(k), 0, j)),
      "state": pl.BlockSpec((None, s, d), lambda b, j, k: (b, 0, j)),  # (batch, state, channels)
    }


def _forward(u, delta, A, B, C, *, reverse, interpret, max_chunk, max_block_d, save_starts):
  """Runs the forward kernel: ((y, h_last), [chunk-start states]) with the states (batch, chunks,
  state, channels) in the plan's padded sizes, or no states unless `save_starts`."""
  batch, length, channels = u.shape
  plan = _Plan(u, A, max_chunk=max_chunk, max_block_d=max_block_d)
  specs = plan.specs(from_last_chunk=reverse)
  out_specs = [specs["seq"], specs["state"]]
  out_shape = [(batch, plan.length, plan.channels), (batch, plan.state, plan.channels)]
  if save_starts:
    out_specs.append(specs["chunk_state"])
    out_shape.append((batch, plan.num_chunks, plan.state, plan.channels))
  y, h_last, *starts = pl.pallas_call(
    functools.partial(_forward_kernel, chunk=plan.chunk, reverse=reverse, save_starts=save_starts),
    grid=plan.grid,
    in_specs=[specs["seq"], specs["seq"], specs["A"], specs["bc"], specs["bc"]],
    out_specs=out_specs,
    out_shape=[jax.ShapeDtypeStruct(shape, u.dtype) for shape in out_shape],
    scratch_shapes=[pltpu.VMEM((plan.state, plan.block_d), u.dtype)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
    interpret=_interpret_params(interpret, u.dtype),
    name="selective_scan_fwd",
  )(*plan.pad(u, delta, A, B, C))
  h_last = jnp.swapaxes(h_last[:, : A.shape[1], :channels], 1, 2)
  return (y[:, :length, :channels], h_last), starts


def _backward(u, delta, A, B, C, starts, dy, dh_last, *, reverse, interpret, max_chunk, max_block_d):
  """Runs the backward kernel and sums its partials: (du, ddelta, dA, dB, dC)."""
  batch, length, channels = u.shape
  state = A.shape[1]
  plan = _Plan(u, A, max_chunk=max_chunk, max_block_d=max_block_d)
  specs = plan.specs(from_last_chunk=not reverse)  # the opposite order to the forward pass
  dy = pad_to(pad_to(dy, 2, plan.channels), 1, plan.length)
  dh_last = pad_to(pad_to(jnp.swapaxes(dh_last, 1, 2), 1, plan.state), 2, plan.channels)
  seq_shape = (batch, plan.length, plan.channels)
  partial_shape = (batch, plan.channels // plan.block_d, plan.length, plan.state)
  du, ddelta, dB, dC, dA = pl.pallas_call(
    functools.partial(_backward_kernel, chunk=plan.chunk, reverse=reverse),
    grid=plan.grid,
    in_specs=[specs[k] for k in ("seq", "seq", "A", "bc", "bc", "chunk_state", "seq", "state")],
    out_specs=[specs[k] for k in ("seq", "seq", "bc_partial", "bc_partial", "state")],
    out_shape=[
      jax.ShapeDtypeStruct(shape, u.dtype)
      for shape in (seq_shape, seq_shape, partial_shape, partial_shape, dh_last.shape)
    ],
    scratch_shapes=[
      pltpu.VMEM((plan.chunk, plan.state, plan.block_d), u.dtype),
      pltpu.VMEM((plan.state, plan.block_d), u.dtype),
      pltpu.VMEM((plan.state, plan.block_d), u.dtype),
    ],
    compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
    interpret=_interpret_params(interpret, u.dtype),
    name="selective_scan_bwd",
  )(*plan.pad(u, delta, A, B, C), starts, dy, dh_last)
  du, ddelta = (x[:, :length, :channels] for x in (du, ddelta))
  dB, dC = (x.sum(axis=1)[:, :length, :state] for x in (dB, dC))
  return du, ddelta, dA.sum(axis=0)[:state, :channels].T, dB, dC


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _scan(u, delta, A, B, C, reverse, interpret, max_chunk, max_block_d):
  options = dict(reverse=reverse, interpret=interpret, max_chunk=max_chunk, max_block_d=max_block_d)
  return _forward(u, delta, A, B, C, save_starts=False, **options)[0]


def _scan_fwd(u, delta, A, B, C, reverse, interpret, max_chunk, max_block_d):
  options = dict(reverse=reverse, interpret=interpret, max_chunk=max_chunk, max_block_d=max_block_d)
  out, (starts,) = _forward(u, delta, A, B, C, save_starts=True, **options)
  return out, (u, delta, A, B, C, starts)


def _scan_bwd(reverse, interpret, max_chunk, max_block_d, residuals, cotangents):
  options = dict(reverse=reverse, interpret=interpret, max_chunk=max_chunk, max_block_d=max_block_d)
  return _backward(*residuals, *cotangents, **options)


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  *,
  reverse: bool,
  interpret: bool = False,
  max_chunk: int = MAX_CHUNK,
  max_block_d: int = MAX_BLOCK_D,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.scan`, forward and gradients by Pallas TPU kernels. `max_chunk`
  bounds the positions per grid step, `max_block_d` (a multiple of 128) the channels per block."""
  return _scan(u, delta, A, B, C, reverse, interpret, max_chunk, max_block_d)
