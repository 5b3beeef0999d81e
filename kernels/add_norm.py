"""Vim's residual add and the next block's RMSNorm in one pass, as a Pallas GPU kernel (`reference`: the same in XLA).

Between two Vim blocks the float32 residual stream takes the mixer's output and is normed for the next mixer
(mamba_ssm's fused add + norm): r' = r + h, y = r' / sqrt(mean(r'²) + eps) · w. XLA runs that as two kernels,
a loop fusion for the add and a Triton normalization fusion for the norm (it gives a Triton fusion one output
only), and the norm reads r' back: per element, 4 + 2 bytes in and 4 out for the add, 4 in and 2 out for the norm.
The kernel reads r and h once and writes r' (over r, in inference) and y: 10 of those 16 bytes per element.
Pallas on Triton, as the scan's other kernels (`selective_scan.pallas_gpu` says why).

`add_norm_project` also multiplies y by the next mixer's in_proj (on the tensor cores, y never written), for
inference at few rows, where it was measured faster (`project_pays`). `projected_add_norm` multiplies the last
mixer's output by its out_proj first (h never written), for inference at many rows.

One program per block of `BLOCK_ROWS` rows, the row in power-of-two pieces (Triton's blocks are powers of two:
Vim-Ti's 192 is 128 + 64); rows past the end are masked, since r' is written over r (no overlapping block may
read a row twice).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.per_device import per_device

# H100 (add_norm_tune_h100.json): at 1248², batch 32, Vim-Ti, XLA's two kernels take 0.211 ms, this one 0.164 with
# 16 rows and 8 warps (2.7 TB/s), 0.164-0.174 with 32 or 64 rows and 4 or 8 warps; at 224², batch 128, 0.035 and 0.035.
BLOCK_ROWS = 16
NUM_WARPS = 8
SMALLEST_PIECE = 16  # the narrowest power-of-two piece of a row a Triton block takes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype=None) -> jax.Array:
  """x / sqrt(mean(x²) + eps) · weight in float32, cast to `dtype` (x's by default): mamba_ssm's `rms_norm_ref`."""
  x32 = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * rstd * weight).astype(dtype or x.dtype)


def reference(residual: jax.Array, hidden: jax.Array, weight: jax.Array, eps: float, dtype) -> tuple[jax.Array, ...]:
  """(residual + hidden in float32, its RMSNorm in `dtype`): what the kernel computes, in XLA."""
  total = residual + hidden.astype(jnp.float32)
  return total, rms_norm(total, weight, eps, dtype)


def supported(dim: int) -> bool:
  """Whether the kernel takes rows of `dim` features: whole pieces of `SMALLEST_PIECE` (Vim's 192, 384, 768)."""
  return dim % SMALLEST_PIECE == 0


def add_norm(
  residual: jax.Array, hidden: jax.Array, weight: jax.Array, *, eps: float, dtype, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
  """(r', y): `reference` in the kernel, differentiable, r' written over `residual`. Where it runs instead of XLA is
  the caller's rule (Vim's: where the mixer's other kernels run, `vim.uses_add_norm_kernel`).

  Args:
    residual: (..., dim) float32, the residual stream; dim `supported`.
    hidden: residual's shape, any float dtype (a mixer's output).
    weight: (dim,) the norm's weight.
    eps: the norm's epsilon.
    dtype: y's dtype (the next matmuls').
    interpret: Pallas interpret mode (CPU tests).
  Under a mesh the kernel runs per device (`shard_map`), the rows split over every mesh axis along the first
  dimension.
  """
  _check(residual, hidden, weight, "add_norm")
  fn = functools.partial(_fused, eps=eps, dtype=jnp.dtype(dtype), interpret=interpret)
  return per_device(fn, (residual, hidden), (weight,))


def _check(residual: jax.Array, hidden: jax.Array | None, weight: jax.Array, caller: str) -> None:
  dim = residual.shape[-1]
  if residual.dtype != jnp.float32:
    raise ValueError(f"{caller}: `residual` must be float32 (the residual stream), got {residual.dtype}")
  if hidden is not None and hidden.shape != residual.shape:
    raise ValueError(f"{caller}: `hidden` must have residual's shape {residual.shape}, got {hidden.shape}")
  if weight.shape != (dim,):
    raise ValueError(f"{caller}: `weight` must be ({dim},), got {weight.shape}")
  if not supported(dim):
    raise ValueError(f"{caller}: the feature dim must be a multiple of {SMALLEST_PIECE}, got {dim}")


def _unsupported(caller: str, projection: jax.Array, needs: str) -> ValueError:
  return ValueError(
    f"{caller}: `projection` of shape {projection.shape} and dtype {projection.dtype} is not supported: {needs}"
  )


def _pieces(dim: int) -> list[tuple[int, int]]:
  """(start, width) of the power-of-two pieces of a row, widest first: 192 → (0, 128), (128, 64)."""
  widths = [1 << bit for bit in reversed(range(dim.bit_length())) if dim & (1 << bit)]
  starts = [sum(widths[:i]) for i in range(len(widths))]
  return list(zip(starts, widths))


def _row_block(rows: int, block_rows: int):
  """This program's `block_rows` rows: their slice, and (block_rows, 1) which lie before `rows` (the rest masked)."""
  start = pl.program_id(0) * block_rows
  return pl.ds(start, block_rows), (start + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)) < rows


def _add_rows(r_ref, hidden, r_out_ref, block, inside) -> list[jax.Array]:
  """r' = r + h for the rows `block`, stored (masked by `inside`) and returned float32, one array per `_pieces`; h is
  a ref of the rows or, given as a list, the block's pieces of it in registers."""
  totals = []
  for i, (column, width) in enumerate(_pieces(r_ref.shape[1])):
    mask = jnp.broadcast_to(inside, (inside.shape[0], width))
    at = (block, pl.ds(column, width))
    h = hidden[i] if isinstance(hidden, list) else plgpu.load(hidden.at[at], mask=mask, other=0)
    total = plgpu.load(r_ref.at[at], mask=mask, other=0.0) + h.astype(jnp.float32)
    plgpu.store(r_out_ref.at[at], total, mask=mask)
    totals.append(total)
  return totals


def _normed_rows(totals: list[jax.Array], w_ref, eps: float) -> list[jax.Array]:
  """RMSNorm of the rows whose `_pieces` are `totals` (float32), one array per piece."""
  dim = w_ref.shape[0]
  rstd = jax.lax.rsqrt(sum(jnp.sum(total * total, axis=1, keepdims=True) for total in totals) / dim + eps)
  columns = [column for column, _ in _pieces(dim)]
  return [
    total * rstd * w_ref[pl.ds(column, total.shape[1])].astype(jnp.float32)[None, :]
    for column, total in zip(columns, totals, strict=True)
  ]


def _store_rows(y_ref, pieces: list[jax.Array], block, inside) -> None:
  """The rows `block` of y_ref from their `_pieces`, in y_ref's dtype, rows past the end masked."""
  column = 0
  for y in pieces:
    plgpu.store(
      y_ref.at[block, pl.ds(column, y.shape[1])], y.astype(y_ref.dtype), mask=jnp.broadcast_to(inside, y.shape)
    )
    column += y.shape[1]


def _kernel(r_ref, h_ref, w_ref, r_out_ref, y_ref, *, rows: int, eps: float):
  """One block of `BLOCK_ROWS` rows: r' and y, rows past `rows` masked. r_out_ref is r_ref's buffer (aliased)."""
  block, inside = _row_block(rows, BLOCK_ROWS)  # read at trace time: add_norm_tune.py sets it
  totals = _add_rows(r_ref, h_ref, r_out_ref, block, inside)
  _store_rows(y_ref, _normed_rows(totals, w_ref, eps), block, inside)


def _backward_kernel(
  total_ref, d_normed_ref, d_total_ref, w_ref, d_residual_ref, d_hidden_ref, d_weight_ref, *, rows, eps
):
  """One block of `BLOCK_ROWS` rows of the norm's VJP at r' (`total`) plus r''s own cotangent: d_residual (float32)
  and the same in hidden's dtype, and the block's share of the weight's gradient (row `program_id` of
  `d_weight_ref`; `_backward` sums the blocks). With x̂ = r' · rstd and g = d_normed · w:
  d_r' = d_total + rstd (g − x̂ · mean(g x̂)), d_w = Σ_rows d_normed · x̂."""
  dim = total_ref.shape[1]
  block, inside = _row_block(rows, BLOCK_ROWS)
  pieces, xs, d_normeds, gs = _pieces(dim), [], [], []
  for column, width in pieces:
    mask = jnp.broadcast_to(inside, (BLOCK_ROWS, width))
    at = (block, pl.ds(column, width))
    xs.append(plgpu.load(total_ref.at[at], mask=mask, other=0.0))
    d_normeds.append(plgpu.load(d_normed_ref.at[at], mask=mask, other=0).astype(jnp.float32))
    gs.append(d_normeds[-1] * w_ref[pl.ds(column, width)].astype(jnp.float32)[None, :])
  rstd = jax.lax.rsqrt(sum(jnp.sum(x * x, axis=1, keepdims=True) for x in xs) / dim + eps)
  mean_gx = sum(jnp.sum(g * x, axis=1, keepdims=True) for g, x in zip(gs, xs, strict=True)) * rstd / dim
  for (column, width), x, d_normed, g in zip(pieces, xs, d_normeds, gs, strict=True):
    mask = jnp.broadcast_to(inside, (BLOCK_ROWS, width))
    at = (block, pl.ds(column, width))
    x_hat = x * rstd
    d = plgpu.load(d_total_ref.at[at], mask=mask, other=0.0) + (g - x_hat * mean_gx) * rstd
    plgpu.store(d_residual_ref.at[at], d, mask=mask)
    plgpu.store(d_hidden_ref.at[at], d.astype(d_hidden_ref.dtype), mask=mask)
    d_weight_ref[pl.program_id(0), pl.ds(column, width)] = jnp.sum(d_normed * x_hat, axis=0)  # masked rows add 0


def _backward(total, weight, d_total, d_normed, *, eps: float, hidden_dtype, interpret: bool):
  """(d_residual, d_hidden, d_weight) of `_fused`: the norm's VJP at r' plus d_total, in one pass over the rows."""
  shape, dim = total.shape, total.shape[-1]
  rows = total.size // dim
  blocks = pl.cdiv(rows, BLOCK_ROWS)
  d_residual, d_hidden, d_weight = pl.pallas_call(
    functools.partial(_backward_kernel, rows=rows, eps=eps),
    grid=(blocks,),
    out_shape=[
      jax.ShapeDtypeStruct((rows, dim), jnp.float32),
      jax.ShapeDtypeStruct((rows, dim), hidden_dtype),
      jax.ShapeDtypeStruct((blocks, dim), jnp.float32),
    ],
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    name="add_norm_bwd",
  )(*(x.reshape(rows, dim) for x in (total, d_normed, d_total)), weight)
  return d_residual.reshape(shape), d_hidden.reshape(shape), d_weight.sum(0).astype(weight.dtype)


def _call(residual, hidden, weight, *, eps: float, dtype, interpret: bool, in_place: bool):
  """`in_place` writes r' over the residual's buffer; XLA copies that buffer first wherever the residual is still
  needed after the call (`_fused` says when)."""
  shape, dim = residual.shape, residual.shape[-1]
  rows = residual.size // dim
  total, normed = pl.pallas_call(
    functools.partial(_kernel, rows=rows, eps=eps),
    grid=(pl.cdiv(rows, BLOCK_ROWS),),
    out_shape=[jax.ShapeDtypeStruct((rows, dim), jnp.float32), jax.ShapeDtypeStruct((rows, dim), dtype)],
    input_output_aliases={0: 0} if in_place else {},
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    name="add_norm",
  )(residual.reshape(rows, dim), hidden.reshape(rows, dim), weight)
  return total.reshape(shape), normed.reshape(shape)


# Jitted: every block's call shares one traced kernel, lowered once. Module constants (BLOCK_ROWS, NUM_WARPS) are
# read when it is first traced for a shape: after changing one, `jax.clear_caches()`.
@functools.partial(jax.jit, static_argnames=("eps", "dtype", "interpret"))
def _fused(residual, hidden, weight, *, eps: float, dtype, interpret: bool):
  """The kernel, bound with `jax.custom_vjp`: the backward is a kernel too (`_backward`), the norm's VJP at r' (kept)
  plus r''s own cotangent, which is also hidden's, where XLA ran about 96 fusions per step (Vim-Ti's training step at
  224², batch 128 on an H100: 32.97 -> 32.73 ms, ab_add_norm_bwd_kernel_vim_tiny_train_h100.txt).

  Differentiated, r' goes to a buffer of its own: the residual it would overwrite is the previous block's r', which
  that block's backward keeps, so XLA copied it before every call (23 copies of the stream, 0.36 ms of a Vim-Ti
  training step at 224², batch 128 on an H100, profile_vim_tiny_224_train_fortieth_session_no_command_buffers_h100
  .json; without them the step went 33.32 -> 32.92 ms, ab_add_norm_copies_vim_tiny_train_h100.txt). Inference
  writes r' over the residual, which nothing reads again."""
  hidden_dtype = hidden.dtype
  call = functools.partial(_call, eps=eps, dtype=dtype, interpret=interpret)

  @jax.custom_vjp
  def run(residual, hidden, weight):
    return call(residual, hidden, weight, in_place=True)

  def run_fwd(residual, hidden, weight):
    total, normed = call(residual, hidden, weight, in_place=False)
    return (total, normed), (total, weight)

  def run_bwd(saved, cotangents):
    total, weight = saved
    d_total, d_normed = cotangents
    return _backward(total, weight, d_total, d_normed, eps=eps, hidden_dtype=hidden_dtype, interpret=interpret)

  run.defvjp(run_fwd, run_bwd)
  return run(residual, hidden, weight)


# The add + norm with the next mixer's in_proj (`add_norm_project`): rows per program so that a block's float32 sums
# stay in registers (64 × 192 for Vim-Ti), warps, and output columns per matmul tile. H100, Vim-Ti: 64 rows, 4 warps
# and tiles of 128 were the fastest of 12 settings at 224², 1024² and 1248² (32-128 rows, 4 or 8 warps, tiles of 64
# or 128; add_norm_project_ab_h100.txt). Compiled offline for sm_90 (the `triton` package), it holds 228 registers per
# thread: two programs per SM.
PROJECT_BLOCK_ELEMENTS = 64 * 192
PROJECT_NUM_WARPS = 4
PROJECT_TILE = 128


def project_supported(dim: int, width: int, dtype) -> bool:
  """Whether `add_norm_project` takes rows of `dim` features into two halves of `width` columns in `dtype`: whole
  `SMALLEST_PIECE`s (the dot's K pieces), halves of whole tiles of 16 or more, and a 16-bit dtype (Triton's dot
  would round float32 to tf32; float32 models keep XLA's matmul)."""
  return supported(dim) and _tile(width) >= SMALLEST_PIECE and jnp.dtype(dtype).itemsize == 2


# Where the one kernel pays (H100, add_norm_project_ab_h100.txt, Vim-Ti): at 224², batch 128 (25,216 rows) it took 50.1
# against the two launches' 56.7 us, and Vim-Ti's forward went from 7.43 to 7.17 ms with 20 MiB fewer temporaries;
# at 1024² and 1248², batch 32 (131,104 and 194,720 rows) it was as fast as they (234 against 232 us, 335 against
# 334), and the forward 0.2 ms slower with 48-57 MiB more temporaries (x and z are written while h is still read), so
# the model runs it up to this many rows (ab_add_norm_project_vim_tiny_h100.txt).
PROJECT_MAX_ROWS = 32768


def project_pays(rows: int) -> bool:
  """Whether `add_norm_project` was measured faster than the two launches for this many rows (`PROJECT_MAX_ROWS`): all
  of a call's rows, before a mesh splits them (the rule errs towards the two launches there)."""
  return rows <= PROJECT_MAX_ROWS


def _tile(width: int) -> int:
  """The widest power of two up to `PROJECT_TILE` dividing `width`: each half's matmul columns per step."""
  return math.gcd(width, PROJECT_TILE) if width & (width - 1) else min(width, PROJECT_TILE)


def _project_rows(dim: int) -> int:
  """Rows per program: `PROJECT_BLOCK_ELEMENTS` / dim, a power of two from 16 (the dot's least M) on."""
  return max(SMALLEST_PIECE, 1 << (max(PROJECT_BLOCK_ELEMENTS // dim, 1).bit_length() - 1))


def add_norm_project(
  residual: jax.Array,
  hidden: jax.Array,
  weight: jax.Array,
  projection: jax.Array,
  *,
  eps: float,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(r', first, second): `add_norm`'s r', and its norm y (in `projection`'s dtype) times each half of
  `projection`'s columns, in one pass: y never goes to memory (Vim's add + norm and the next in_proj, whose x and z
  halves the conv and scan kernels read contiguous). r' is written over `residual`. Not differentiable: the model
  runs it where nothing is (`layers.add_norm_in_proj` says how it is differentiated).

  Args:
    residual, hidden, weight, eps: as `add_norm`'s.
    projection: (dim, 2 · width) in a 16-bit float dtype, `project_supported`.
  Under a mesh the kernel runs per device, as `add_norm`.
  """
  dim = residual.shape[-1]
  if projection.ndim != 2 or projection.shape[0] != dim or projection.shape[1] % 2:
    raise ValueError(f"add_norm_project: `projection` must be ({dim}, 2 · width), got {projection.shape}")
  if not project_supported(dim, projection.shape[1] // 2, projection.dtype):
    needs = f"dim a multiple of {SMALLEST_PIECE}, each half's width a multiple of {SMALLEST_PIECE}, a 16-bit dtype"
    raise _unsupported("add_norm_project", projection, needs)
  _check(residual, hidden, weight, "add_norm_project")
  fn = functools.partial(_projected, eps=eps, interpret=interpret)
  return per_device(fn, (residual, hidden), (weight, projection))


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _projected(residual, hidden, weight, projection, *, eps: float, interpret: bool):
  shape, dim = residual.shape, residual.shape[-1]
  rows, width = residual.size // dim, projection.shape[1] // 2
  block_rows = _project_rows(dim)
  total, first, second = pl.pallas_call(
    functools.partial(_project_kernel, rows=rows, block_rows=block_rows, eps=eps),
    grid=(pl.cdiv(rows, block_rows),),
    out_shape=[
      jax.ShapeDtypeStruct((rows, dim), jnp.float32),
      *[jax.ShapeDtypeStruct((rows, width), projection.dtype)] * 2,
    ],
    input_output_aliases={0: 0},
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=PROJECT_NUM_WARPS, num_stages=1),
    name="add_norm_project",
  )(residual.reshape(rows, dim), hidden.reshape(rows, dim), weight, projection)
  return total.reshape(shape), *(half.reshape((*shape[:-1], width)) for half in (first, second))


def _project_kernel(r_ref, h_ref, w_ref, p_ref, r_out_ref, first_ref, second_ref, *, rows, block_rows, eps):
  """One block of rows: r' and y as `_kernel`'s (y kept in registers, in the projection's dtype, as XLA's matmul
  would read it), then y · each half of the projection, `_tile` columns at a time, float32 sums."""
  dim, width = r_ref.shape[1], first_ref.shape[1]
  block, inside = _row_block(rows, block_rows)
  pieces, totals = _pieces(dim), _add_rows(r_ref, h_ref, r_out_ref, block, inside)
  normed = [y.astype(p_ref.dtype) for y in _normed_rows(totals, w_ref, eps)]
  tile = _tile(width)
  for half, out_ref in enumerate((first_ref, second_ref)):

    def project_tile(j, carry, half=half, out_ref=out_ref):
      columns = pl.ds(pl.multiple_of(j * tile, tile), tile)
      weights = pl.ds(pl.multiple_of(half * width + j * tile, tile), tile)
      out = sum(
        jnp.dot(y, p_ref[pl.ds(column, piece), weights], preferred_element_type=jnp.float32)
        for (column, piece), y in zip(pieces, normed, strict=True)
      )
      plgpu.store(out_ref.at[block, columns], out.astype(out_ref.dtype), mask=jnp.broadcast_to(inside, out.shape))
      return carry

    jax.lax.fori_loop(0, width // tile, project_tile, 0)


# The last mixer's out_proj before the add + norm (`projected_add_norm`): rows per program, warps, the contraction's
# columns per step and the steps whose loads are in flight. H100, Vim-Ti (projected_add_norm_ab_h100.txt): 64 rows, 4
# warps, steps of 64 and 3 stages were the fastest of 16 settings at 1024² and 1248², batch 32 (142.3 and 207.5 us
# against the two launches' 168.7 and 244.9) and within 0.5 us of the fastest at 224², batch 128 (35.6 against 53.0).
# Compiled offline for sm_90 (the `triton` package) it holds 255 registers and spills 228 bytes; 8 warps spill none
# but took 195.9 us at 1024² with the other settings the same.
PROJECTED_BLOCK_ROWS = 64
PROJECTED_NUM_WARPS = 4
PROJECTED_K_TILE = 64
PROJECTED_NUM_STAGES = 3


# Where the model runs `projected_add_norm` (`vim.projects_between_blocks`): where `add_norm_project` does not. Vim-Ti's
# forward on an H100, rounds alternating (ab_projected_add_norm_tuned_vim_tiny_h100.txt,
# ab_projected_add_norm_224_vim_tiny_h100.txt): 32.07 -> 31.51 ms at 1024², batch 32, 46.73 -> 46.08 at 1248²; at
# 224², batch 128 the add + norm with in_proj stayed faster (7.47 against 7.61 ms with this kernel instead).
PROJECTED_MIN_ROWS = PROJECT_MAX_ROWS + 1


def projected_pays(rows: int) -> bool:
  """Whether the model runs `projected_add_norm` for this many rows (`PROJECTED_MIN_ROWS`): all of a call's rows, as
  `project_pays`'s."""
  return rows >= PROJECTED_MIN_ROWS


def projected_supported(width: int, dim: int, dtype) -> bool:
  """Whether `projected_add_norm` takes mixer outputs of `width` features projected to rows of `dim` in `dtype`: whole
  contraction steps of 16 or more, `supported` rows, and a 16-bit dtype (as `project_supported`)."""
  return supported(dim) and _k_tile(width) >= SMALLEST_PIECE and jnp.dtype(dtype).itemsize == 2


def _k_tile(width: int) -> int:
  """The widest power of two up to `PROJECTED_K_TILE` dividing `width`: the contraction's columns per step."""
  return math.gcd(width, PROJECTED_K_TILE)


def projected_add_norm(
  residual: jax.Array,
  mixed: jax.Array,
  projection: jax.Array,
  weight: jax.Array,
  *,
  eps: float,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """(r', y): `add_norm` of the residual and h = mixed · projection, rounded to `projection`'s dtype as a matmul in
  that dtype writes it, in one pass: h never goes to memory (a Vim mixer's out_proj, the residual add and the next
  norm). y is in `projection`'s dtype; r' is written over `residual`. Not differentiable: the model runs it where
  nothing is (`layers.projected_add_norm` says how it is differentiated).

  Args:
    residual, weight, eps: as `add_norm`'s.
    mixed: (..., width) in `projection`'s dtype, residual's leading shape.
    projection: (width, dim), `projected_supported`.
  Under a mesh the kernel runs per device, as `add_norm`.
  """
  dim = residual.shape[-1]
  if projection.ndim != 2 or projection.shape[1] != dim:
    raise ValueError(f"projected_add_norm: `projection` must be (width, {dim}), got {projection.shape}")
  width = projection.shape[0]
  if mixed.shape != (*residual.shape[:-1], width) or mixed.dtype != projection.dtype:
    raise ValueError(
      f"projected_add_norm: `mixed` must be {(*residual.shape[:-1], width)} in {projection.dtype} (residual's rows, "
      f"projection's width and dtype), got {mixed.shape} in {mixed.dtype}"
    )
  if not projected_supported(width, dim, projection.dtype):
    raise _unsupported("projected_add_norm", projection, f"both sides multiples of {SMALLEST_PIECE}, a 16-bit dtype")
  _check(residual, None, weight, "projected_add_norm")
  fn = functools.partial(_out_projected, eps=eps, interpret=interpret)
  return per_device(fn, (residual, mixed), (projection, weight))


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _out_projected(residual, mixed, projection, weight, *, eps: float, interpret: bool):
  shape, dim = residual.shape, residual.shape[-1]
  rows, width = residual.size // dim, projection.shape[0]
  total, normed = pl.pallas_call(
    functools.partial(_out_projected_kernel, rows=rows, block_rows=PROJECTED_BLOCK_ROWS, eps=eps),
    grid=(pl.cdiv(rows, PROJECTED_BLOCK_ROWS),),
    out_shape=[jax.ShapeDtypeStruct((rows, dim), jnp.float32), jax.ShapeDtypeStruct((rows, dim), projection.dtype)],
    input_output_aliases={0: 0},
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=PROJECTED_NUM_WARPS, num_stages=PROJECTED_NUM_STAGES),
    name="projected_add_norm",
  )(residual.reshape(rows, dim), mixed.reshape(rows, width), projection, weight)
  return total.reshape(shape), normed.reshape(shape)


def _out_projected_kernel(r_ref, m_ref, p_ref, w_ref, r_out_ref, y_ref, *, rows, block_rows, eps):
  """One block of rows: h = m · p in float32 sums over `_k_tile` steps, one sum per `_pieces` of the row, rounded to
  p's dtype; then r' = r + h and y as `_kernel`'s."""
  dim, width = r_ref.shape[1], m_ref.shape[1]
  block, inside = _row_block(rows, block_rows)
  pieces, k_tile = _pieces(dim), _k_tile(width)

  def accumulate(k, sums):
    ks = pl.ds(pl.multiple_of(k * k_tile, k_tile), k_tile)
    m = plgpu.load(m_ref.at[block, ks], mask=jnp.broadcast_to(inside, (block_rows, k_tile)), other=0)
    return tuple(
      s + jnp.dot(m, p_ref[ks, pl.ds(column, piece)], preferred_element_type=jnp.float32)
      for s, (column, piece) in zip(sums, pieces, strict=True)
    )

  zeros = tuple(jnp.zeros((block_rows, piece), jnp.float32) for _, piece in pieces)
  sums = jax.lax.fori_loop(0, width // k_tile, accumulate, zeros)
  totals = _add_rows(r_ref, [h.astype(p_ref.dtype) for h in sums], r_out_ref, block, inside)
  _store_rows(y_ref, _normed_rows(totals, w_ref, eps), block, inside)
