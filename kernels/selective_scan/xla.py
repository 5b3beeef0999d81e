"""Selective scan in plain XLA, chunked over length so memory stays bounded.

A whole-sequence associative scan materialises (batch, length, channels, state) several times over,
and autodiff would keep it alive until the backward pass. Instead the length is cut into chunks of at
most `MAX_CHUNK` positions: a scan runs inside each chunk, a sequential `lax.scan` carries the state
from chunk to chunk, and the chunk body is rematerialised (`jax.checkpoint`), so the only residuals are
one (batch, channels, state) state per chunk and peak memory is one chunk's worth.

Inside a chunk, accelerators run `lax.associative_scan` (log-depth, parallel over positions). On a CPU its
parallel form buys little and its extra work (more products, a pass per level over the chunk's states) costs,
so there the chunk's positions go one after another (`WITHIN_CHUNK`). Forward+backward of one direction on 2
CPU cores, float32, two runs: 6.3-13.3 against 27-33 ms at the demo's shapes (batch 64, length 17, 128
channels, state 8), 104-113 against 285-311 ms at Vim-Ti's (batch 8, length 197, 384 channels, state 16)
(scan_cpu.py, scan_cpu_within_chunk.txt); the demo trains in 1 min 19 s against 2 min 1 s.
"""

import functools

import jax
import jax.numpy as jnp

from kernels.selective_scan import reference

# Speed barely depends on it (memory-bound: on an H100, fwd+bwd of a Vim-tiny mixer at 197 and 1025
# tokens took the same time within ~20%, no trend, for 8 to 256). It trades the scratch of the chunk being
# processed (about 4 x batch*chunk*channels*state floats) against the per-chunk states saved for the
# backward pass (length/chunk of them, kept for every layer and direction); for Vim's 24 layers x 2
# directions at 197-1025 tokens their sum is lowest around 50-110.
MAX_CHUNK = 64
# How each chunk's positions are scanned, by backend (`within_chunk`'s default).
WITHIN_CHUNK = {"cpu": "sequential"}


def _combine(earlier, later):
  """Composes two steps h -> a*h + b (`earlier` applied first): an associative operator."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  *,
  reverse: bool,
  max_chunk: int = MAX_CHUNK,
  within_chunk: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.scan`; `max_chunk` bounds the positions scanned at once. `within_chunk`:
  "associative" or "sequential", None by backend (`WITHIN_CHUNK`, else associative)."""
  if within_chunk is None:
    within_chunk = WITHIN_CHUNK.get(jax.default_backend(), "associative")
  if within_chunk not in ("associative", "sequential"):
    raise ValueError(f"within_chunk must be 'associative' or 'sequential', got {within_chunk!r}")
  batch, length, channels = u.shape
  num_chunks = -(-length // max_chunk)
  chunk = -(-length // num_chunks)  # equal chunks, so the padding is under num_chunks positions
  pad = num_chunks * chunk - length

  def to_chunks(x):
    # Zero padding is the identity step (decay exp(0 * A) = 1, input 0). It sits after the last
    # position: forward it comes after everything, so the final state is unchanged; in reverse it
    # comes first, while the state is still zero.
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    return jnp.swapaxes(x.reshape(batch, num_chunks, chunk, x.shape[-1]), 0, 1)

  # prevent_cse=False: inside a scan body XLA cannot CSE the recomputation away, so the guard that
  # would otherwise stop it only costs speed.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_step(h, xs):
    u, delta, B, C = xs  # (batch, chunk, channels) x2, (batch, chunk, state) x2
    if within_chunk == "sequential":
      y, h_last = reference.scan(u, delta, A, B, C, reverse=reverse, h0=h)
      return h_last, y
    decay = jnp.exp(delta[..., None] * A)  # (batch, chunk, channels, state)
    drive = (delta * u)[..., None] * B[:, :, None, :]
    decay_prod, h_local = jax.lax.associative_scan(_combine, (decay, drive), axis=1, reverse=reverse)
    hs = decay_prod * h[:, None] + h_local  # fold in the state carried from the previous chunk
    y = jnp.sum(hs * C[:, :, None, :], axis=-1)  # not einsum: dots may lose precision on TPU/GPU
    return hs[:, 0 if reverse else -1], y

  h0 = reference.zero_state(u, A)
  xs = tuple(to_chunks(x) for x in (u, delta, B, C))
  h_last, y = jax.lax.scan(chunk_step, h0, xs, reverse=reverse)
  y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk, channels)
  return y[:, :length], h_last
