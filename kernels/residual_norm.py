"""A Vim block's end as one Pallas GPU kernel: out_proj, the add to the float32 residual stream and the next RMSNorm.

Between two mixers XLA runs out_proj as a cuBLAS matmul that writes the mixer's output, then fusions that add it
to the residual stream and normalise the sum for the next mixer (and, every few layers, materialise the residual
with an add of its own). Here each program takes a block of rows of the scan's output y, multiplies it by out_proj's
kernel on tensor cores with float32 accumulation, rounds the product to y's dtype (as XLA's matmul writes it),
adds it to the residual (times a per-row drop-path scale, if given) and writes the new residual and its RMSNorm:
the mixer's output never goes to memory. The backward is XLA's (`vim_jax.models.layers.project_add_norm`).
Pallas on Triton, as the scan's kernels (`selective_scan.pallas_gpu` says why).

Rows are a (rows, channels) view of (batch, length, channels); blocks of `BLOCK_ROWS` rows, the last one ending at
the last row (overlapping the one before and rewriting equal values). Channels are loaded in power-of-two pieces
(Triton's tensors must have power-of-two sizes; Vim-Ti's 192 is three pieces of 64).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from kernels.selective_scan.padding import pad_to

BLOCK_ROWS = 64  # rows of y per step
BLOCK_K = 128  # of out_proj's contraction (y's channels) per product
NUM_WARPS = 4
NUM_STAGES = 2  # blocks of rows whose loads are in flight (Triton's pipelining of the loop over blocks)
PROGRAMS = 132  # persistent programs, each walking blocks pid, pid + PROGRAMS, ...
# The widest residual stream whose block of float32 sums stays in registers (Vim-S's 384; Vim-B uses XLA).
MAX_DIM = 384


def supported(channels: int, dim: int, dtype) -> bool:
  """Whether the kernel takes y with `channels` channels in `dtype` and a residual stream `dim` wide: 2-byte floats
  (tensor cores), whole blocks of 16 channels, and a residual stream of at most MAX_DIM."""
  return jnp.dtype(dtype).itemsize == 2 and channels % 16 == 0 and dim % 16 == 0 and dim <= MAX_DIM


def reference(y, kernel, residual, norm_weight, row_scale, *, eps: float, out_dtype):
  """The same in XLA: (new residual in float32, its RMSNorm in `out_dtype`) (for tests, and the model's XLA path)."""
  hidden = jnp.dot(y, kernel, preferred_element_type=jnp.float32).astype(y.dtype).astype(jnp.float32)
  if row_scale is not None:
    hidden = hidden * row_scale[..., None]
  residual = residual + hidden
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(residual), axis=-1, keepdims=True) + eps)
  return residual, (residual * rstd * norm_weight).astype(out_dtype)


def project_add_norm(
  y: jax.Array,
  kernel: jax.Array,
  residual: jax.Array,
  norm_weight: jax.Array,
  row_scale: jax.Array | None = None,
  *,
  eps: float,
  out_dtype=None,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """(residual + row_scale · (y · kernel), RMSNorm of that · norm_weight): `reference` in one kernel.

  Args:
    y: (batch, length, channels), the mixer's output before out_proj, in a 2-byte float dtype.
    kernel: (channels, dim) out_proj's kernel in y's dtype.
    residual: (batch, length, dim) float32, the residual stream.
    norm_weight: (dim,) float32, the next RMSNorm's weight.
    row_scale: None, or (batch, length) float32 multiplying each row's out_proj output (drop path).
    eps: the RMSNorm's epsilon.
    out_dtype: the normalised output's dtype (y's by default).
    interpret: Pallas interpret mode (CPU tests).
  Under a mesh the kernel runs per device (`shard_map`), the batch split over every mesh axis.
  """
  batch, length, channels = y.shape
  dim = kernel.shape[1]
  if kernel.shape != (channels, dim) or kernel.dtype != y.dtype:
    raise ValueError(
      f"project_add_norm: `kernel` must be ({channels}, dim) in {y.dtype}, got {kernel.shape} {kernel.dtype}"
    )
  if residual.shape != (batch, length, dim) or residual.dtype != jnp.float32:
    raise ValueError(
      f"project_add_norm: `residual` must be ({batch}, {length}, {dim}) float32, got {residual.shape} {residual.dtype}"
    )
  if norm_weight.shape != (dim,):
    raise ValueError(f"project_add_norm: `norm_weight` must be ({dim},), got {norm_weight.shape}")
  if row_scale is not None and row_scale.shape != (batch, length):
    raise ValueError(f"project_add_norm: `row_scale` must be ({batch}, {length}), got {row_scale.shape}")
  if not supported(channels, dim, y.dtype):
    raise ValueError(
      f"project_add_norm: unsupported shapes or dtype (channels {channels}, dim {dim}, {y.dtype}); check `supported`"
    )
  fn = functools.partial(_call, eps=eps, out_dtype=jnp.dtype(out_dtype or y.dtype), interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(y, kernel, residual, norm_weight, row_scale)
  rows = P(mesh.axis_names)
  specs = (rows, P(), rows, P(), None if row_scale is None else rows)
  args = (y, kernel, residual, norm_weight, row_scale)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    args = tuple(a if s is None else jax.sharding.reshard(a, s) for a, s in zip(args, specs))
  return jax.shard_map(fn, in_specs=specs, out_specs=(rows, rows), check_vma=False)(*args)


def _call(y, kernel, residual, norm_weight, row_scale, *, eps: float, out_dtype, interpret: bool):
  batch, length, channels = y.shape
  dim = kernel.shape[1]
  rows = batch * length
  padded_rows = max(rows, 16)  # a block of at least 16 rows (Triton's dot); tiny inputs (tests) are padded up to one
  block_rows = min(BLOCK_ROWS, pl.next_power_of_2(padded_rows + 1) // 2)
  flat = [pad_to(a.reshape(rows, a.shape[-1]), 0, padded_rows) for a in (y, residual)]
  scaled = row_scale is not None
  scale = [pad_to(row_scale.reshape(rows), 0, padded_rows)] if scaled else []
  piece = min(dim & -dim, 128)  # the largest power of two dividing dim, up to 128
  block_k = next(k for k in (BLOCK_K, 64, 32, 16) if channels % k == 0)

  def whole(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))

  new_residual, normed = pl.pallas_call(
    functools.partial(
      _kernel, rows=padded_rows, block_rows=block_rows, block_k=block_k, piece=piece, eps=eps, scaled=scaled
    ),
    grid=(min(PROGRAMS, pl.cdiv(padded_rows, block_rows)),),
    in_specs=[whole(flat[0].shape), whole(kernel.shape), whole(flat[1].shape), whole((dim,))]
    + [whole((padded_rows,))] * scaled,
    out_specs=[whole((padded_rows, dim))] * 2,
    out_shape=[jax.ShapeDtypeStruct((padded_rows, dim), t) for t in (jnp.float32, out_dtype)],
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    name="project_add_norm",
  )(flat[0], kernel, flat[1], norm_weight.astype(jnp.float32), *scale)
  return tuple(a[:rows].reshape(batch, length, dim) for a in (new_residual, normed))


def _kernel(y_ref, w_ref, residual_ref, weight_ref, *refs, rows, block_rows, block_k, piece, eps, scaled):
  """Blocks pid, pid + programs, ... of rows: the out_proj product in `piece`-wide column blocks, the add and the
  norm. The last block starts early enough to end at the last row; its overlap rewrites equal values."""
  scale_ref, new_residual_ref, normed_ref = refs if scaled else (None, *refs)
  pid, programs = pl.program_id(0), pl.num_programs(0)
  blocks = (rows + block_rows - 1) // block_rows

  def one_block(k, carry):
    start = jnp.minimum((pid + k * programs) * block_rows, rows - block_rows)
    _block(pl.ds(start, block_rows), y_ref, w_ref, residual_ref, weight_ref, scale_ref, new_residual_ref, normed_ref,
           block_rows=block_rows, block_k=block_k, piece=piece, eps=eps)  # fmt: skip
    return carry

  jax.lax.fori_loop(0, (blocks - pid + programs - 1) // programs, one_block, 0)


def _block(block, y_ref, w_ref, residual_ref, weight_ref, scale_ref, new_residual_ref, normed_ref, *, block_rows,
           block_k, piece, eps):  # fmt: skip
  """The rows `block`; no drop-path scale without `scale_ref`."""
  channels, dim = w_ref.shape
  columns = [pl.ds(j, piece) for j in range(0, dim, piece)]
  sums = [jnp.zeros((block_rows, piece), jnp.float32) for _ in columns]
  for k in range(0, channels, block_k):
    y = y_ref[block, pl.ds(k, block_k)]
    sums = [
      s
      + jax.lax.dot_general(
        y, w_ref[pl.ds(k, block_k), c], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )
      for s, c in zip(sums, columns)
    ]
  hidden = [s.astype(y_ref.dtype).astype(jnp.float32) for s in sums]  # rounded as XLA's matmul writes it
  if scale_ref is not None:
    row_scale = scale_ref[block]
    hidden = [h * row_scale[:, None] for h in hidden]
  residual = [residual_ref[block, c] + h for c, h in zip(columns, hidden)]
  mean_square = sum(jnp.sum(r * r, axis=1) for r in residual) / dim
  rstd = jax.lax.rsqrt(mean_square + eps)[:, None]
  for c, r in zip(columns, residual):
    new_residual_ref[block, c] = r
    normed_ref[block, c] = (r * rstd * weight_ref[c]).astype(normed_ref.dtype)
