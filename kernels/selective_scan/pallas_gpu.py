"""Selective scan forward as a Pallas GPU kernel on the Triton backend; gradients via `xla.scan`.

Triton rather than Mosaic GPU (the backend Pallas is moving to): the scan is a sequential recurrence
over length with a small per-channel state, which Triton expresses as one loop over values held in
registers, with no shared-memory pipeline or warpgroup code to write; and it runs on jax 0.11 and 0.12
(deprecated there since 0.11: lowering warns, so a Mosaic GPU port is due before it is removed).

Each program owns `block_d` channels of one sequence and all of their state, (block_d, state) floats
in registers, and walks the length one position at a time: the (batch, length, channels, state) states
never touch HBM. Triton tensors need power-of-two sizes, so channels are zero-padded to a multiple of
`block_d` and state to a power of two (A = B = C = 0 there keeps padded entries at h = 0 and out of y).

Long sequences are split into chunks of at most `CHUNK` positions so that a small batch still gives
enough programs to fill the GPU: pass 1 scans every chunk from a zero state and keeps only its end
state; a short `lax.scan` over chunks (in XLA) carries the true state into each chunk, using the
chunk's total decay exp(A · Σ delta); pass 2 rescans every chunk from its true start state and writes y.
Padding positions (delta = 0, u = 0) are identity steps, in either direction.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.selective_scan.autodiff import with_xla_backward

# Untuned starting points: 32 channels x 16 states is 512 floats of state, 8 per thread with 2 warps;
# Vim's 384 channels then give batch x 12 programs per chunk. Two stages may let Triton prefetch the
# next position's inputs while the current one computes. CHUNK bounds the positions one program walks.
BLOCK_D = 32
NUM_WARPS = 2
NUM_STAGES = 2
CHUNK = 256


def _kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, *out_refs, chunk: int, reverse: bool, write_y: bool):
  """One (sequence, channel block, chunk): refs are u/delta/y (chunk, block_d), B/C (chunk, state), A,
  the chunk's start state and its end state (block_d, state)."""
  *y_ref, h_ref = out_refs
  A = A_ref[...]

  def step(i, h):
    t = chunk - 1 - i if reverse else i
    delta = delta_ref[t, :]
    drive = (delta * u_ref[t, :])[:, None] * B_ref[t, :][None, :]
    h = jnp.exp(delta[:, None] * A) * h + drive
    if write_y:
      # Multiply-and-sum rather than a dot: Triton dots need 16-wide operands and may use TF32.
      y_ref[0][t, :] = jnp.sum(h * C_ref[t, :][None, :], axis=1)
    return h

  h_ref[...] = jax.lax.fori_loop(0, chunk, step, h0_ref[...])


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` along `axis` up to `size`; a no-op (no copy) when it is already that size."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _chunk_pass(u, delta, A, B, C, h0, *, chunk, reverse, write_y, block_d, num_warps, interpret):
  """Scans every (sequence, channel block, chunk) from its start state h0 (batch, chunks, channels,
  state); returns the end states of the chunks (same shape), and y (batch, length, channels) if asked."""
  batch, length, channels = u.shape
  num_chunks, state = h0.shape[1], A.shape[1]
  seq_spec = pl.BlockSpec((None, chunk, block_d), lambda b, d, k: (b, k, d))
  bc_spec = pl.BlockSpec((None, chunk, state), lambda b, d, k: (b, k, 0))
  chunk_state_spec = pl.BlockSpec((None, None, block_d, state), lambda b, d, k: (b, k, d, 0))
  chunk_states = jax.ShapeDtypeStruct((batch, num_chunks, channels, state), u.dtype)
  outputs = pl.pallas_call(
    functools.partial(_kernel, chunk=chunk, reverse=reverse, write_y=write_y),
    grid=(batch, channels // block_d, num_chunks),
    in_specs=[
      seq_spec,
      seq_spec,
      pl.BlockSpec((block_d, state), lambda b, d, k: (d, 0)),
      bc_spec,
      bc_spec,
      chunk_state_spec,
    ],
    out_specs=[seq_spec, chunk_state_spec] if write_y else [chunk_state_spec],
    out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype), chunk_states] if write_y else [chunk_states],
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
    interpret=interpret,
    name="selective_scan_fwd" if write_y else "selective_scan_chunk_states",
  )(u, delta, A, B, C, h0)
  return outputs if write_y else (None, outputs[0])


def _carry_into_chunks(delta, A, chunk_end, *, chunk: int, reverse: bool) -> jax.Array:
  """The true state entering each chunk, from the chunks' zero-start end states and total decays."""
  batch, length, channels = delta.shape
  total_delta = delta.reshape(batch, length // chunk, chunk, channels).sum(axis=2)
  decay = jnp.exp(total_delta[..., None] * A)  # (batch, chunks, channels, state)

  def step(h, xs):
    chunk_decay, end = xs
    return chunk_decay * h + end, h  # emit the state entering this chunk

  xs = (jnp.swapaxes(decay, 0, 1), jnp.swapaxes(chunk_end, 0, 1))
  _, h_in = jax.lax.scan(step, jnp.zeros_like(chunk_end[:, 0]), xs, reverse=reverse)
  return jnp.swapaxes(h_in, 0, 1)


def forward(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  *,
  reverse: bool,
  interpret: bool = False,
  block_d: int = BLOCK_D,
  num_warps: int = NUM_WARPS,
  max_chunk: int = CHUNK,
) -> tuple[jax.Array, jax.Array]:
  """The kernel alone (no autodiff rule): same contract as `reference.scan`; `block_d` channels
  (a power of two) per program, at most `max_chunk` positions per program."""
  batch, length, channels = u.shape
  state = A.shape[1]
  block_d = min(block_d, pl.next_power_of_2(channels))
  padded_channels = pl.cdiv(channels, block_d) * block_d
  padded_state = pl.next_power_of_2(state)
  num_chunks = pl.cdiv(length, max_chunk)
  chunk = pl.cdiv(length, num_chunks)  # equal chunks: under num_chunks padding positions
  padded_length = num_chunks * chunk
  u, delta = (_pad_to(_pad_to(x, 2, padded_channels), 1, padded_length) for x in (u, delta))
  B, C = (_pad_to(_pad_to(x, 2, padded_state), 1, padded_length) for x in (B, C))
  A = _pad_to(_pad_to(A, 0, padded_channels), 1, padded_state)

  options = dict(chunk=chunk, reverse=reverse, block_d=block_d, num_warps=num_warps, interpret=interpret)
  h0 = jnp.zeros((batch, num_chunks, padded_channels, padded_state), u.dtype)
  if num_chunks > 1:
    _, chunk_end = _chunk_pass(u, delta, A, B, C, h0, write_y=False, **options)
    h0 = _carry_into_chunks(delta, A, chunk_end, chunk=chunk, reverse=reverse)
  y, chunk_end = _chunk_pass(u, delta, A, B, C, h0, write_y=True, **options)
  h_last = chunk_end[:, 0 if reverse else num_chunks - 1]
  return y[:, :length, :channels], h_last[:, :channels, :state]


_forward_with_xla_backward = with_xla_backward(forward)


def scan(
  u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, reverse: bool, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.scan`: forward by the Pallas kernel, gradients by `xla.scan`."""
  return _forward_with_xla_backward(u, delta, A, B, C, reverse=reverse, interpret=interpret)
