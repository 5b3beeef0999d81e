"""Small layers of the Vim backbone: initialisers, RMSNorm, matmuls with their own backward, drop path, layer
scan, depthwise conv, pos-embed resize.

Each initialiser reproduces one rule of the official PyTorch code (vim_spec.md §2) so that a freshly
built model has the same statistics as the official one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels import Columns, add_norm, conv_silu
from kernels import step_projections as projections_kernel

Initializer = nnx.Initializer


# ----------------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------------


def uniform_symmetric(bound: float) -> Initializer:
  """U(-bound, bound): PyTorch's default Linear/Conv init is this with bound = 1/sqrt(fan_in)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def trunc_normal(std: float, lower: float = -2.0, upper: float = 2.0) -> Initializer:
  """timm's `trunc_normal_(std, a, b)`: N(0, std²) truncated at the *absolute* bounds a, b.

  With std 0.02 and bounds ±2 the truncation never bites, which is what the official code gets.
  """

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, lower / std, upper / std, shape, dtype)

  return init


def lecun_normal_timm_0_4(fan_in: int) -> Initializer:
  """timm 0.4.12 `lecun_normal_` (the pinned version): std sqrt(1/fan_in)/0.8796, bounds ±2 absolute."""
  return trunc_normal(math.sqrt(1.0 / fan_in) / 0.87962566103423978)


def mamba_dt_bias(dt_min: float, dt_max: float, dt_floor: float) -> Initializer:
  """Mamba's `dt_proj.bias`: inverse softplus of dt ~ log-uniform[dt_min, dt_max], dt >= dt_floor."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


def s4d_real_log(d_state: int) -> Initializer:
  """S4D-real `A_log`: log(1, 2, ..., N) for every channel, so A = -exp(A_log) = -(1..N)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    channels, n = shape
    assert n == d_state, (shape, d_state)
    return jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (channels, n))).astype(dtype)

  return init


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · weight, computed in float32 (mamba_ssm `rms_norm_ref`)."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
    return add_norm.rms_norm(x, self.weight[...], self.eps, dtype)

  def add(
    self, residual: jax.Array, hidden: jax.Array, *, dtype, kernel: bool, interpret: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """(residual + hidden in float32, its norm in `dtype`): mamba_ssm's fused add + norm between blocks. With
    `kernel`, `kernels.add_norm`'s one pass; in XLA the sum is `materialized` before the norm reads it."""
    if kernel:
      weight = self.weight[...]
      return add_norm.add_norm(residual, hidden, weight, eps=self.eps, dtype=dtype, interpret=interpret)
    total = materialized(residual + hidden.astype(jnp.float32))
    return total, self(total, dtype)


def kernel_where_undifferentiated(kernel: Callable, separate: Callable) -> Callable:
  """A function that runs `kernel` (no backward) where nothing differentiates it and `separate`, launches with the
  same values whose backward exists, where something does: a custom VJP whose forward rule is `separate`'s VJP."""

  @jax.custom_vjp
  def call(*args):
    return kernel(*args)

  call.defvjp(lambda *args: jax.vjp(separate, *args), lambda pullback, cotangents: pullback(cotangents))
  return call


def add_norm_in_proj(
  residual: jax.Array,
  hidden: jax.Array,
  weight: jax.Array,
  in_proj: jax.Array,
  *,
  eps: float,
  precision: jax.lax.PrecisionLike,
  interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(r', x, z): a block's add + norm (`RMSNorm.add` with the kernel) and its mixer's in_proj halves.

  Undifferentiated (inference) it is one kernel, `add_norm.add_norm_project`: the norm's output never goes to
  memory. Differentiated, it runs the two launches whose backward exists, `add_norm.add_norm` and `matmul_halves`,
  with the same values (the kernel's norm rounds to in_proj's dtype as the first launch does)."""
  kernel = functools.partial(add_norm.add_norm_project, eps=eps, interpret=interpret)
  separate = functools.partial(add_norm_then_in_proj, eps=eps, precision=precision, interpret=interpret)
  return kernel_where_undifferentiated(kernel, separate)(residual, hidden, weight, in_proj)


def add_norm_then_in_proj(residual, hidden, weight, in_proj, *, eps, precision, interpret):
  total, normed = add_norm.add_norm(residual, hidden, weight, eps=eps, dtype=in_proj.dtype, interpret=interpret)
  return total, *matmul_halves(normed, in_proj, precision)


def projected_add_norm(
  residual: jax.Array,
  mixed: jax.Array,
  out_proj: jax.Array,
  weight: jax.Array,
  *,
  eps: float,
  precision: jax.lax.PrecisionLike,
  interpret: bool,
) -> tuple[jax.Array, jax.Array]:
  """(r', y): the last mixer's out_proj of `mixed`, added to the residual and normed (`RMSNorm.add` with the kernel),
  y in out_proj's dtype.

  Undifferentiated (inference) it is one kernel, `add_norm.projected_add_norm`: the projection never goes to memory.
  Differentiated, it runs `dense` and `add_norm.add_norm`, with the same values."""
  kernel = functools.partial(add_norm.projected_add_norm, eps=eps, interpret=interpret)
  separate = functools.partial(out_proj_then_add_norm, eps=eps, precision=precision, interpret=interpret)
  return kernel_where_undifferentiated(kernel, separate)(residual, mixed, out_proj, weight)


def out_proj_then_add_norm(residual, mixed, out_proj, weight, *, eps, precision, interpret):
  hidden = dense(mixed, out_proj, precision)
  return add_norm.add_norm(residual, hidden, weight, eps=eps, dtype=out_proj.dtype, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_halves(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> tuple[jax.Array, jax.Array]:
  """(x · kernel's first half of columns, x · its second half), each written by its own matmul.

  One matmul and a split copies both halves wherever each must be contiguous (the conv and scan kernels
  reading Vim's x and z). XLA's dot merger would join the two matmuls again (its size limit lets Vim-Ti's
  through), so the second reads x through an optimization barrier. The backward is one matmul of the
  concatenated gradients: two (autodiff's, or written out) made the training step 0.4-0.9 ms slower in
  three runs. Vim-Ti at 224², batch 128, H100: forward 10.5-10.6 -> 10.0 ms in four runs, training step
  within noise (ab_in_proj_split_vim_tiny_h100.json)."""
  return _matmul_halves_fwd(x, kernel, precision)[0]


def _matmul_halves_fwd(x, kernel, precision):
  first, second = jnp.split(kernel, 2, axis=-1)
  out = jnp.dot(x, first, precision=precision), jnp.dot(jax.lax.optimization_barrier(x), second, precision=precision)
  return out, (x, kernel)


def _matmul_halves_bwd(precision, residuals, cotangents):
  return _halves_grads(precision, *residuals, jnp.concatenate(cotangents, axis=-1))


def _halves_grads(precision, x, kernel, d_out):
  """(dx, dkernel) from the whole output's cotangent, both halves'."""
  # Written once: XLA gave each of the two matmuls its own copy of the concatenation. Vim-Ti's training step at
  # 224², batch 128, H100: 48.7-48.8 -> 47.8 ms (ab_in_proj_gradient_written_once_vim_tiny_h100.json).
  d_out = jax.lax.optimization_barrier(d_out)
  rows = tuple(range(x.ndim - 1))
  d_x = jnp.dot(d_out, kernel.T, precision=precision, out_sharding=_sharded_like(x))
  d_kernel = jax.lax.dot_general(
    x, d_out, ((rows, rows), ((), ())), precision=precision, out_sharding=_sharded_like(kernel)
  )
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


matmul_halves.defvjp(_matmul_halves_fwd, _matmul_halves_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_windows(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> tuple[Columns, Columns]:
  """x · kernel as one matmul, as `Columns` windows of its first and second half of columns: for consumers that read
  a window in place (Vim's conv and scan kernels read x and z so), x is read once and nothing is split. Vim-Ti's
  in_proj alone, H100: 176.7 -> 141.8 µs at 1248², batch 32, 126.7 -> 103.7 at 1024² (in_proj_ab_h100.txt)."""
  return _matmul_windows_fwd(x, kernel, precision)[0]


def _matmul_windows_fwd(x, kernel, precision):
  out, half = jnp.dot(x, kernel, precision=precision), kernel.shape[-1] // 2
  return (Columns(out, 0, half), Columns(out, half, half)), (x, kernel)


def _matmul_windows_bwd(precision, residuals, cotangents):
  # Each window's cotangent is the whole output's, zero outside the window (`Columns.cotangent`).
  return _halves_grads(precision, *residuals, cotangents[0].array + cotangents[1].array)


matmul_windows.defvjp(_matmul_windows_fwd, _matmul_windows_bwd)


# Groups of rows whose weight-gradient partial sums `dense` adds at the end (at most; a divisor of the batch).
WEIGHT_GRADIENT_GROUPS = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
  """x · kernel over x's last axis (a bias-free Linear), whose weight gradient is `weight_gradient`'s."""
  return jnp.dot(x, kernel, precision=precision)


def _dense_fwd(x, kernel, precision):
  return dense(x, kernel, precision), (x, kernel)


def _dense_bwd(precision, residuals, d_out):
  x, kernel = residuals
  d_x = jnp.dot(d_out, kernel.T, precision=precision, out_sharding=_sharded_like(x))
  d_kernel = weight_gradient(x, d_out, precision).astype(kernel.dtype)
  return d_x.astype(x.dtype), _resharded_like(d_kernel, kernel)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def step_projections(u_f: jax.Array, u_b: jax.Array, packed: jax.Array, rank: int, interpret: bool):
  """Both directions' x_proj and dt_proj: ((projected, delta) forward, (projected, delta) backward).

  The forward is `kernels.step_projections` (one Pallas GPU launch for the four matmuls); the backward is
  XLA's matmuls, the transposes of `step_projections.reference`, with weight gradients as `weight_gradient`'s."""
  return _step_projections_fwd(u_f, u_b, packed, rank, interpret)[0]


def _step_projections_fwd(u_f, u_b, packed, rank, interpret):
  out = projections_kernel.project(u_f, u_b, packed, rank=rank, interpret=interpret)
  return out, (u_f, u_b, packed, out[0][0], out[1][0])


def _step_projections_bwd(rank, interpret, residuals, cotangents):
  del interpret
  *us, packed, projected_f, projected_b = residuals
  width = packed.shape[2] - rank
  grads = []
  for u, weights, projected, (d_projected, d_delta) in zip(us, packed, (projected_f, projected_b), cotangents):
    x_proj, dt_proj_t = weights[:, :width], weights[:, width:]
    d_low = jnp.dot(d_delta, dt_proj_t, out_sharding=_sharded_like(projected))
    d_projected = jnp.concatenate(
      [d_projected[..., :rank] + d_low.astype(d_projected.dtype), d_projected[..., rank:]], -1
    )
    d_u = jnp.dot(d_projected, x_proj.T, out_sharding=_sharded_like(u))
    d_weights = jnp.concatenate(
      [weight_gradient(u, d_projected, None), weight_gradient(d_delta, projected[..., :rank], None)], axis=1
    )
    grads.append((d_u.astype(u.dtype), d_weights.astype(packed.dtype)))
  (d_uf, d_wf), (d_ub, d_wb) = grads
  return d_uf, d_ub, _resharded_like(jnp.stack([d_wf, d_wb]), packed)


step_projections.defvjp(_step_projections_fwd, _step_projections_bwd)


def weight_gradient(x: jax.Array, d_out: jax.Array, precision: jax.lax.PrecisionLike) -> jax.Array:
  """xᵀ · d_out summed over all leading axes, as one matmul per group of whole samples, added in float32.

  The sum runs over batch × tokens rows (25,216 for Vim-Ti at 224², batch 128), which XLA's GPU matmuls
  split into partial sums themselves, padding both operands to a multiple of the split first: 240 pads
  (2.1 ms) in a Vim-Ti training step on an H100. Groups of whole samples split the rows exactly: with
  them the step took a median 50.5 against 51.5 ms (rounds: 48.5-54.0 against 51.2-53.4) and 1 GB less
  temporary memory (ab_weight_gradients_aligned_rank_vim_tiny_h100.json)."""
  groups = math.gcd(x.shape[0], WEIGHT_GRADIENT_GROUPS)
  x, d_out = (_in_groups(a, groups) for a in (x, d_out))
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  partial_sums = jax.lax.dot_general(
    x, d_out, (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=accumulate
  )
  return partial_sums.sum(0)


def _in_groups(a: jax.Array, groups: int) -> jax.Array:
  """a (batch, ..., features) as (groups, rows, features), the groups split over devices as the batch is."""
  sharding = jax.typeof(a).sharding
  explicit = jax.sharding.AxisType.Explicit in sharding.mesh.axis_types
  spec = jax.sharding.PartitionSpec(sharding.spec[0] if sharding.spec else None) if explicit else None
  return a.reshape(groups, -1, a.shape[-1], out_sharding=spec)


def reshape_samples(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x.reshape(shape) that keeps the leading (sample) axis and its sharding: under explicit mesh axes a reshape of
  the other axes needs its output's sharding said."""
  sharding = jax.typeof(x).sharding
  out_sharding = None if sharding.mesh.empty else sharding.update(spec=jax.sharding.PartitionSpec(sharding.spec[0]))
  return jnp.reshape(x, shape, out_sharding=out_sharding)


def sharded_as(x: jax.Array, like: jax.Array) -> jax.Array:
  """x laid out as `like` under explicit mesh axes (where one op's operands must be sharded alike); as is elsewhere."""
  sharding = jax.typeof(like).sharding
  return x if sharding.mesh.empty else jax.sharding.reshard(x, sharding.spec)


def _sharded_like(primal: jax.Array) -> jax.sharding.NamedSharding | None:
  """How autodiff lays out a gradient (explicit meshes need it said): as its primal, or replicated on the
  current mesh where the primal is on none (a parameter closed over)."""
  sharding = jax.typeof(primal).sharding
  if not sharding.mesh.empty:
    return sharding
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _resharded_like(gradient: jax.Array, primal: jax.Array) -> jax.Array:
  """`gradient` laid out as `_sharded_like(primal)` says, where a mesh is set."""
  sharding = _sharded_like(primal)
  return gradient if sharding is None else jax.sharding.reshard(gradient, sharding)


def drop_path(x: jax.Array, rate: float | jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth (timm `DropPath`): drop whole samples with prob `rate`, rescale by 1/keep.

  Deterministic (identity) when `rngs` is None or a static rate is 0. A traced rate (the layer scan's)
  of 0 keeps every sample (uniform draws are < 1) and divides by 1: an exact identity too. The division is
  in float32 and rounded to x's dtype, as PyTorch's `x.div(keep_prob)` of a bf16 tensor under autocast.
  """
  if rngs is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, (x.astype(jnp.float32) / keep).astype(x.dtype), jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
  """The linear rule of Vim and timm (`linspace(0, rate, depth)`): block j drops with rate · j / (depth − 1)."""
  return tuple(rate * j / max(depth - 1, 1) for j in range(depth))


@jax.custom_jvp
def materialized(x: jax.Array) -> jax.Array:
  """x, which XLA must write out whole where nothing differentiates it (an optimization barrier).

  Why (`RMSNorm.add` in XLA): left free, XLA adds a Vim block's output to the residual stream only every other
  block, recomputing the sum inside the next norm; each deferred output, a (batch, length, dim) array, stays alive
  beside everything the next block holds. Vim-Ti's inference peaked 71 MiB higher so at 1248², batch 32
  (memory_offline.py); writing the residual every block costs 0.12 ms of 70 there and 0.13 of 7.4 at 224², batch
  128 (H200, ab_inference_memory_vim_tiny_h200.txt). Under differentiation it is the identity: a plain barrier per
  block made Vim-Ti's training step at 224², batch 128 hold 111 MiB more."""
  return jax.lax.optimization_barrier(x)


materialized.defjvp(lambda primals, tangents: (primals[0], tangents[0]))


def apply_blocks(
  blocks: Sequence[nnx.Module],
  x: jax.Array | tuple[jax.Array, ...],
  rngs: nnx.Rngs | None,
  *,
  rates: Sequence[float],
  scan: bool,
  remat: bool,
) -> jax.Array | tuple[jax.Array, ...]:
  """x through `blocks` in order, each called as `block(x)` or `block(x, drop_rate=rate, rngs=rngs)`; x is an
  array or a tuple of them (Vim's residual stream and the last mixer's output), which every block returns alike.

  `scan=True` stacks the blocks' states at call time and runs one `lax.scan` over them: the block is
  traced and compiled once instead of once per layer (an unrolled Vim-Ti compiles 24 copies of every
  kernel), while the parameter tree stays per layer for checkpoints, conversion and sharding rules.
  That needs blocks of one structure, hence drop-path rates passed as data rather than kept on the
  blocks. Blocks must not update their state when called (the scan returns none). Drop path draws one
  key per layer from `rngs` in both modes, so scanned and unrolled blocks compute the same function.
  `remat` recomputes each block in the backward pass.
  """
  if len(rates) != len(blocks):
    raise ValueError(f"`rates` has {len(rates)} entries for {len(blocks)} blocks")
  stochastic = rngs is not None and any(rate > 0 for rate in rates)
  keys = jax.random.split(rngs.dropout(), len(blocks)) if stochastic else None

  def apply(block, x, rate, key):
    if key is None:
      return block(x)
    return block(x, drop_rate=rate, rngs=nnx.Rngs(dropout=key))

  if not scan:
    apply = nnx.remat(apply) if remat else apply
    for i, block in enumerate(blocks):  # static rates: a rate of 0 skips drop path altogether
      x = apply(block, x, rates[i], keys[i] if stochastic else None)
    return x

  graphdef, stacked = _stack_states(blocks)

  def body(x, layer):
    # The barrier materialises this layer's slice of the stack once: fused into elementwise loops, the
    # dynamic slice made XLA:CPU's forward pass 30-45% slower (it recomputed the slice per element).
    state, rate, key = jax.lax.optimization_barrier(layer)
    return apply(nnx.merge(graphdef, state), x, rate, key), None

  body = jax.checkpoint(body, prevent_cse=False) if remat else body
  xs = (stacked, jnp.asarray(rates, jnp.float32) if stochastic else None, keys)
  x, _ = jax.lax.scan(body, _sharded_like_output(body, x, xs), xs)
  return x


def _sharded_like_output(body, x, xs):
  """x resharded as the scan body returns it. Under explicit mesh axes a block may change the sharding
  of its input (the kernels' shard_map splits the batch), where the scan's carry must keep one type."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return x
  out, _ = jax.eval_shape(lambda x, xs: body(x, jax.tree.map(lambda a: a[0], xs)), x, xs)
  return jax.tree.map(lambda a, o: jax.sharding.reshard(a, o.sharding.spec), x, out)


def _stack_states(blocks: Sequence[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """The blocks' shared graphdef and their states stacked along a new leading (layer) axis."""

  def split(block):
    graphdef, state = nnx.split(block)
    return graphdef, state, [(a.shape, a.dtype) for a in jax.tree.leaves(state)]

  graphdef, first, avals = split(blocks[0])
  states = [first]
  for i, block in enumerate(blocks[1:], 1):
    block_graphdef, state, block_avals = split(block)
    if (block_graphdef, block_avals) != (graphdef, avals):
      raise ValueError(
        f"scanning over layers needs blocks of one structure, but block {i} ({type(block).__name__}) differs "
        f"from block 0 ({type(blocks[0]).__name__}) in its static attributes or parameter shapes; "
        "build the model with scan_layers=False"
      )
    states.append(state)
  return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class DepthwiseConv1d(nnx.Module):
  """Depthwise causal conv over the token axis (mamba's `conv1d`), optionally anti-causal.

  `kernel` (K, channels) is the official (channels, 1, K) weight transposed. Forward:
  c[t] = bias + Σ_k kernel[k] · x[t − (K−1) + k] with zeros before the start. `reverse=True` computes
  the same conv on the reversed sequence, in original order (c[t] = bias + Σ_k kernel[k] · x[t + (K−1) − k]),
  which is Vim's backward direction without materialising flipped copies.
  """

  def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(kernel_size)  # PyTorch Conv1d default, fan_in = 1 · K
    self.kernel_size = kernel_size
    self.kernel = nnx.Param(uniform_symmetric(bound)(rngs.params(), (kernel_size, channels)))
    self.bias = nnx.Param(uniform_symmetric(bound)(rngs.params(), (channels,)))

  def __call__(self, x: jax.Array, *, reverse: bool = False) -> jax.Array:
    """x: (batch, length, channels) -> float32 (float64 for float64 inputs) of the same shape."""
    return conv_silu.conv(x, self.kernel[...], self.bias[...], reverse=reverse)


# ----------------------------------------------------------------------------------------------
# Position-embedding resize (torch-exact bicubic)
# ----------------------------------------------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution weights (A = -0.75) for the 4 taps at offsets -1, 0, 1, 2."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix equal to `F.interpolate(mode='bicubic', align_corners=False)` along one axis."""
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
  return matrix


def resize_grid(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of a (h, w, dim) grid to (new_h, new_w, dim), like torch's bicubic interpolate."""
  h, w, _ = grid.shape
  rows = bicubic_matrix(h, new_hw[0])
  cols = bicubic_matrix(w, new_hw[1])
  out = np.einsum("ih,hwd,jw->ijd", rows, grid.astype(np.float64), cols)
  return out.astype(grid.dtype)


def resize_pos_embed(
  pos_embed: np.ndarray,
  old_grid: tuple[int, int],
  new_grid: tuple[int, int],
  *,
  official_quirk: bool = False,
) -> np.ndarray:
  """Resize a middle-cls position embedding (1, gh·gw + 1, dim) to another patch grid.

  The cls slot sits at index M//2 (M = number of patches) in both the old and the new layout and is
  carried over unchanged; the patch part is resized bicubically over the grid.

  `official_quirk=True` reproduces the official fine-tuning code (vim_spec.md §1.3), which assumes the
  extra token at index 0: new[0] = old[0] and new[1:] = resize(old[1:] viewed as a square grid). That
  is how the released stride-8 models were initialised; use it only for bit-compatibility.
  """
  old_m, new_m = old_grid[0] * old_grid[1], new_grid[0] * new_grid[1]
  if pos_embed.ndim != 3 or pos_embed.shape[:2] != (1, old_m + 1):
    raise ValueError(
      f"`pos_embed` must have shape (1, {old_m + 1}, dim) for a {old_grid} grid plus one cls token, "
      f"got {pos_embed.shape}"
    )
  tokens = np.asarray(pos_embed[0])
  if official_quirk:
    side = int(math.sqrt(old_m))
    if side * side != old_m:
      raise ValueError(f"official_quirk needs a square old grid, got {old_grid}")
    grid = resize_grid(tokens[1:].reshape(side, side, -1), new_grid)
    return np.concatenate([tokens[:1], grid.reshape(new_m, -1)])[None]
  old_cls, new_cls = old_m // 2, new_m // 2
  patches = np.concatenate([tokens[:old_cls], tokens[old_cls + 1 :]])
  grid = resize_grid(patches.reshape(*old_grid, -1), new_grid).reshape(new_m, -1)
  return np.concatenate([grid[:new_cls], tokens[old_cls : old_cls + 1], grid[new_cls:]])[None]
