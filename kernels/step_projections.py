"""Vim's x_proj and dt_proj for both scan directions as one Pallas GPU kernel launch (forward only).

Per direction, Mamba projects the conv output u (channels wide) to the step's low rank, B and C (x_proj),
then the low-rank step back to channels (dt_proj). As two XLA matmuls per direction they are four skinny
GEMMs per layer, each writing or reading a channels-wide array, plus the weights' casts and pads. Here
`PROGRAMS` programs per direction each load their direction's weights once and walk blocks of `BLOCK_ROWS`
rows of u (Triton pipelines the loop: the next blocks' loads are in flight while one computes), keeping
each block's projection in registers and writing both outputs: u is read once, the low-rank step does not
go back to memory before dt_proj, and both directions are one launch. The backward stays in XLA
(`vim_jax.models.layers.step_projections`). Pallas on Triton, as the scan's kernels (`selective_scan.pallas_gpu`
says why); Triton's dot runs the products on Hopper's wgmma.

Vim-Ti on an H200 (ab_step_projections_vim_tiny_h200.json, bf16): the forward at 224², batch 128 went from
8.47-8.53 to 8.04-8.12 ms and at 1248², batch 32 from 74.7-74.8 to 74.0 ms (about 3% more peak memory there);
the training step did not change measurably (37.0 against 37.2 ms).

Weights come packed per direction as one (channels, width + rank) array, [x_proj | dt_projᵀ], in u's dtype:
x_proj's columns are the step's (zero-padded to `rank`, a multiple of `PIECE`), B's and C's; dt_proj's
kernel is transposed so that its rows are read like x_proj's. The matmuls run on tensor cores in `PIECE`-wide
column blocks with float32 accumulation, as XLA's bf16 matmuls do; projected is rounded to u's dtype before
dt_proj, as between two matmuls.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.per_device import per_device
from kernels.selective_scan.padding import pad_to

PIECE = 16  # output columns per tensor-core product (Triton's dot needs 16 or more, a power of two)
# Tuned on an H200 (step_projections_tune_h200.txt; both directions, Vim-Ti, bf16): XLA's four matmuls take 48 us
# at 224², batch 128 and 244 us at 1248², batch 32, a copy of both u 43 and 186 us. Persistent programs, 66 per
# direction (one per SM of an H100 or H200 for both), blocks of 32 rows and 128 channels, 4 warps and 3 stages take
# 51 and 189 us; 132 programs per direction 64 and 183; a program per block of rows, 47 and 240 or 59 and 218.
BLOCK_ROWS = 32  # rows of u per step; the last block ends at the last row (overlapping the one before)
BLOCK_CHANNELS = 128  # channels per product: x_proj's contraction, dt_proj's output block
NUM_WARPS = 4
NUM_STAGES = 3  # blocks of rows whose loads are in flight (Triton's pipelining of the loop over blocks)
PROGRAMS = 66  # per direction


# What the weights and the pipelined blocks of u may take of an SM's shared memory (227 KiB on an H100 or
# H200), leaving room for Triton's layout conversions: Vim-Ti (384 channels) needs 120 KiB, Vim-S 288 KiB.
SHARED_MEMORY_BUDGET = 160 * 1024


def supported(channels: int, width: int, rank: int, dtype) -> bool:
  """Whether the kernel takes these shapes and dtype: 2-byte floats (tensor cores; float32 would need TF32 or a
  slow path), whole `PIECE`s, channels that a power-of-two block of 16 or more divides, and weights small
  enough to stay in shared memory beside the blocks in flight (Vim-Ti's; wider models use XLA's matmuls)."""
  itemsize = jnp.dtype(dtype).itemsize
  pieces = width % PIECE == 0 and rank % PIECE == 0 and rank <= width
  shared = channels * (width + rank + NUM_STAGES * BLOCK_ROWS) * itemsize
  return itemsize == 2 and pieces and channels % PIECE == 0 and shared <= SHARED_MEMORY_BUDGET


def reference(u: jax.Array, packed: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """One direction in XLA: (projected, delta) from u and its packed weights (for tests)."""
  width = packed.shape[1] - rank
  projected = jnp.dot(u, packed[:, :width], preferred_element_type=jnp.float32).astype(u.dtype)
  delta = jnp.dot(projected[..., :rank], packed[:, width:].T, preferred_element_type=jnp.float32)
  return projected, delta.astype(u.dtype)


def project(
  u_f: jax.Array, u_b: jax.Array, packed: jax.Array, *, rank: int, interpret: bool = False
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """((projected, delta) forward, (projected, delta) backward): `reference` of each direction.

  Args:
    u_f, u_b: (batch, length, channels), both directions' conv outputs.
    packed: (2, channels, width + rank) in u's dtype, per direction [x_proj | dt_projᵀ] (module docstring).
    rank: the step's rank as packed (zero-padded to a multiple of PIECE).
    interpret: Pallas interpret mode (CPU tests).
  Under a mesh the kernel runs per device (`shard_map`), the batch split over every mesh axis.
  """
  batch, length, channels = u_f.shape
  width = packed.shape[2] - rank
  if u_b.shape != u_f.shape or u_b.dtype != u_f.dtype:
    raise ValueError(
      f"step_projections: u_f and u_b must match, got {u_f.shape} {u_f.dtype} and {u_b.shape} {u_b.dtype}"
    )
  if packed.shape[:2] != (2, channels) or packed.dtype != u_f.dtype:
    raise ValueError(
      f"step_projections: `packed` must be (2, {channels}, width + rank) in {u_f.dtype},"
      f" got {packed.shape} {packed.dtype}"
    )
  if not supported(channels, width, rank, u_f.dtype):
    raise ValueError(
      f"step_projections: unsupported shapes or dtype (channels {channels}, width {width}, rank {rank}, {u_f.dtype});"
      " check `supported` first"
    )
  return per_device(functools.partial(_call, rank=rank, interpret=interpret), (u_f, u_b), (packed,))


# Jitted: every layer's call shares one traced kernel, lowered once. Module constants (PROGRAMS, BLOCK_ROWS, ...) are
# read when it is first traced for a shape: after changing one, `jax.clear_caches()`.
@functools.partial(jax.jit, static_argnames=("rank", "interpret"))
def _call(u_f, u_b, packed, *, rank: int, interpret: bool):
  batch, length, channels = u_f.shape
  width = packed.shape[2] - rank
  rows = batch * length
  # A block of at least PIECE rows: tiny inputs (tests) are padded up to one.
  padded_rows = max(rows, PIECE)
  block_rows = min(BLOCK_ROWS, pl.next_power_of_2(padded_rows + 1) // 2)
  block_channels = next(c for c in (BLOCK_CHANNELS, 64, 32, PIECE) if channels % c == 0)
  us = [pad_to(u.reshape(rows, channels), 0, padded_rows) for u in (u_f, u_b)]
  kernel = functools.partial(
    _kernel, rows=padded_rows, block_rows=block_rows, block_channels=block_channels, width=width, rank=rank
  )
  whole = pl.BlockSpec((padded_rows, channels), lambda i, d: (0, 0))
  weights = pl.BlockSpec((None, channels, width + rank), lambda i, d: (d, 0, 0))  # the program's direction
  outs = [pl.BlockSpec((padded_rows, width), lambda i, d: (0, 0)), whole] * 2
  out_shape = [jax.ShapeDtypeStruct((padded_rows, n), u_f.dtype) for n in (width, channels)] * 2
  projected_f, delta_f, projected_b, delta_b = pl.pallas_call(
    kernel,
    grid=(min(PROGRAMS, pl.cdiv(padded_rows, block_rows)), 2),
    in_specs=[whole, whole, weights],
    out_specs=outs,
    out_shape=out_shape,
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    name="step_projections",
  )(*us, packed)

  def unflat(a):
    return a[:rows].reshape(batch, length, a.shape[1])

  return (unflat(projected_f), unflat(delta_f)), (unflat(projected_b), unflat(delta_b))


def _kernel(uf_ref, ub_ref, w_ref, pf_ref, df_ref, pb_ref, db_ref, *, rows, block_rows, block_channels, width, rank):
  """Blocks pid, pid + programs, ... of `block_rows` rows of one direction (grid axis 1): projected, then delta
  from its first `rank` columns. The last block starts early enough to end at the last row; its overlap
  rewrites equal values."""
  pid, programs = pl.program_id(0), pl.num_programs(0)
  blocks = (rows + block_rows - 1) // block_rows
  channels = uf_ref.shape[1]
  starts = range(0, channels, block_channels)

  def product(a, b, *, transpose_b: bool = False):
    dims = (((1,), (1,)) if transpose_b else ((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

  def direction(u_ref, projected_ref, delta_ref):
    w_x = [[w_ref[pl.ds(c, block_channels), pl.ds(j * PIECE, PIECE)] for j in range(width // PIECE)] for c in starts]
    w_dt = [
      [w_ref[pl.ds(c, block_channels), pl.ds(width + j * PIECE, PIECE)] for j in range(rank // PIECE)] for c in starts
    ]

    def one_block(k, carry):
      start = jnp.minimum((pid + k * programs) * block_rows, rows - block_rows)
      block = pl.ds(start, block_rows)
      us = [u_ref[block, pl.ds(c, block_channels)] for c in starts]
      sums = [jnp.zeros((block_rows, PIECE), jnp.float32) for _ in range(width // PIECE)]
      for u, ws in zip(us, w_x):
        sums = [s + product(u, w) for s, w in zip(sums, ws)]
      projected = [s.astype(projected_ref.dtype) for s in sums]
      for j, piece in enumerate(projected):
        projected_ref[block, pl.ds(j * PIECE, PIECE)] = piece
      for c, ws in zip(starts, w_dt):
        pieces = [product(projected[j], w, transpose_b=True) for j, w in enumerate(ws)]
        delta_ref[block, pl.ds(c, block_channels)] = sum(pieces[1:], pieces[0]).astype(delta_ref.dtype)
      return carry

    jax.lax.fori_loop(0, (blocks - pid + programs - 1) // programs, one_block, 0)

  jax.lax.cond(
    pl.program_id(1) == 0,
    lambda: direction(uf_ref, pf_ref, df_ref),
    lambda: direction(ub_ref, pb_ref, db_ref),
  )
