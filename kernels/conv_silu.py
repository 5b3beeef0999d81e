"""Vim's depthwise conv + SiLU for both scan directions in one pass over x, in XLA or as Pallas GPU kernels.

bimamba v2 convolves the same x twice per layer: causally for the forward direction and anti-causally
(the causal conv of the reversed sequence, in original order) for the backward one, each followed by
SiLU. XLA runs them as two fusions and differentiates them into a dozen small reductions per layer. The
Pallas kernels read x once for both directions: each program loads its block of positions (and the
2(K-1) rows around it) first, then computes; the backward recomputes the pre-activations, writes dx of
both directions at once and one partial sum of the weight and bias gradients per program, which XLA adds.

H100, Vim-Ti 224², batch 128 (ab_conv_silu_kernels_vim_tiny_h100.json, profile_vim_tiny_224_conv_kernels_
no_command_buffers_h100.json): the training step goes from 55.6 / 55.3 to 52.1 / 51.9 ms (the conv's
GPU time from 7.4 to 2.8 ms) at 7% more memory (x is kept for the backward); the forward's conv from 1.26
to 0.82 ms, which leaves the 224² forward unchanged within noise (10.8-11.0 ms) and takes 1248², batch
32 from 100.5 / 101.0 to 100.0 ms.

u_f[t] = silu(b_f + Σ_k w_f[k] x[t - (K-1) + k]),  u_b[t] = silu(b_b + Σ_k w_b[k] x[t + (K-1) - k]),
with zeros outside the sequence; w (K, channels) is the official (channels, 1, K) conv1d weight transposed.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.per_device import per_device
from kernels.selective_scan import ptx
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.padding import compute_dtype, pad_to
from kernels.selective_scan.softplus import silu_grad

IMPLS = ("xla", "pallas_gpu", "pallas", None)
BLOCK_D = 128  # channels per program, one per thread of 4 warps
# Positions per program: each loads its rows (and the 2(K-1) around them) before computing.
FORWARD_BLOCK_T = 32
BACKWARD_BLOCK_T = 16


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, reverse: bool = False) -> jax.Array:
  """The conv alone in XLA, in float32 (or wider): causal, or anti-causal if `reverse`."""
  dtype = compute_dtype(x, kernel, bias)
  taps, length = kernel.shape[0], x.shape[1]
  pad = ((0, 0), (0, taps - 1), (0, 0)) if reverse else ((0, 0), (taps - 1, 0), (0, 0))
  padded = jnp.pad(x.astype(dtype), pad)
  out = bias.astype(dtype)
  for tap in range(taps):
    start = (taps - 1 - tap) if reverse else tap
    out = out + kernel[tap].astype(dtype) * padded[:, start : start + length]
  return out


def conv_silu_bidirectional(
  x: jax.Array | Columns,
  forward: tuple[jax.Array, jax.Array],
  backward: tuple[jax.Array, jax.Array],
  *,
  impl: str | None = None,
  interpret: bool = False,
  consumers: int = 1,
) -> tuple[jax.Array, ...]:
  """(silu(causal conv of x), silu(anti-causal conv of x)), both in x's dtype, differentiable; that pair `consumers`
  times, flat, one pair per consumer of the outputs.

  Vim's u feeds both the scan and the step projections, whose gradients XLA would add in a pass of its own (two
  reads and a write of u's size per direction and layer): given a pair each, the backward kernel receives them
  apart and adds them as it reads them (Vim-Ti's training step at 224², batch 128 on an H100: 32.86 -> 32.43 ms,
  ab_conv_cotangents_apart_vim_tiny_train_h100.txt).

  Args:
    x: (batch, length, channels), or a `Columns` window of a wider array (in_proj's output), which the kernels read
      in place where it is whole blocks of their channels.
    forward, backward: each direction's (kernel (K, channels), bias (channels,)).
    impl: "xla"; "pallas_gpu" (the fused kernels, which run on GPUs or with `interpret`); "pallas" (the kernels on
      GPU, or on CPU with `interpret`; XLA elsewhere); None: the kernels on GPU, XLA elsewhere. Under a
      mesh the kernels run per device (`shard_map`), the batch split over every mesh axis.
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    consumers: how many times the pair is returned (at least 1).
  """
  _check(x, forward, backward)
  if consumers < 1:
    raise ValueError(f"conv_silu_bidirectional: `consumers` must be at least 1, got {consumers}")
  if uses_kernels(impl, interpret):
    fn = functools.partial(fused, interpret=interpret, consumers=consumers)
    return per_device(fn, (x,), (forward, backward))
  if isinstance(x, Columns):
    x = x.value()
  pair = tuple(
    jax.nn.silu(conv(x, kernel, bias, reverse=reverse)).astype(x.dtype)
    for (kernel, bias), reverse in ((forward, False), (backward, True))
  )
  return pair * consumers


def uses_kernels(impl: str | None, interpret: bool) -> bool:
  """Whether `impl` runs the Pallas kernels (the rule that the mixer's other kernels follow too)."""
  if impl not in IMPLS:
    raise ValueError(f"conv_silu_bidirectional: unknown impl {impl!r}; valid impls: {IMPLS}")
  backend = jax.default_backend()
  if impl in ("pallas", None):
    return backend == "gpu" or (impl == "pallas" and backend == "cpu" and interpret)
  return impl == "pallas_gpu"


def _check(x, forward, backward) -> None:
  if len(x.shape) != 3:
    raise ValueError(f"conv_silu_bidirectional: `x` must be (batch, length, channels), got shape {x.shape}")
  channels = x.shape[2]
  for name, (kernel, bias) in (("forward", forward), ("backward", backward)):
    if kernel.ndim != 2 or kernel.shape[1] != channels or bias.shape != (channels,):
      raise ValueError(
        f"conv_silu_bidirectional: `{name}` must be (kernel (K, {channels}), bias ({channels},)) for x with"
        f" {channels} channels, got shapes {kernel.shape} and {bias.shape}"
      )
  if forward[0].shape != backward[0].shape:
    raise ValueError(
      f"conv_silu_bidirectional: both directions need kernels of one shape, got {forward[0].shape} and"
      f" {backward[0].shape}"
    )


class _Window:
  """A program's view of its (length, block_d) block of x: zero rows outside the sequence, and the two
  directions' pre-activations at the centre of a window of 2K - 1 consecutive rows."""

  def __init__(self, x_ref, weight_refs, length: int, taps: int, dtype, native: bool):
    self.x_ref, self.length, self.taps, self.dtype, self.native = x_ref, length, taps, dtype, native
    wf_ref, bf_ref, wb_ref, bb_ref = weight_refs
    self.wf = [wf_ref[k, :].astype(dtype) for k in range(taps)]
    self.wb = [wb_ref[k, :].astype(dtype) for k in range(taps)]
    self.bf, self.bb = bf_ref[...].astype(dtype), bb_ref[...].astype(dtype)

  def row(self, ref, t):
    """ref[t] in the compute dtype, zero outside the sequence (the index is clamped: never out of bounds)."""
    inside = (t >= 0) & (t < self.length)
    return jnp.where(inside, ref[jnp.clip(t, 0, self.length - 1), :].astype(self.dtype), 0.0)

  def pre(self, rows: tuple) -> tuple[jax.Array, jax.Array]:
    """(forward, backward) pre-activations at the centre of rows t - (K-1) .. t + (K-1)."""
    last = 2 * (self.taps - 1)
    pre_f = self.sum_of_products(zip(self.wf, rows), self.bf)
    pre_b = self.sum_of_products(((w, rows[last - k]) for k, w in enumerate(self.wb)), self.bb)
    return pre_f, pre_b

  def sum_of_products(self, pairs, start):
    return ptx.sum_of_products(pairs, start, native=self.native)

  def silu(self, x):
    return ptx.silu(x, native=self.native)

  def silu_grad(self, x):
    return silu_grad(x, functools.partial(ptx.sigmoid, native=self.native))


def _forward_kernel(x_ref, *refs, length: int, taps: int, block_t: int, dtype, native: bool):
  """u_f and u_b for positions t0 .. t0 + block_t of one block of channels. All rows are loaded before
  the first store: a load after a store waits for it (the compiler cannot rule out aliasing)."""
  *weight_refs, uf_ref, ub_ref = refs
  window = _Window(x_ref, weight_refs, length, taps, dtype, native)
  t0, half = pl.program_id(2) * block_t, taps - 1
  rows = [window.row(x_ref, t0 - half + k) for k in range(block_t + 2 * half)]
  for i in range(block_t):
    pre_f, pre_b = window.pre(rows[i : i + 2 * half + 1])

    @pl.when(t0 + i < length)
    def _store(i=i, pre_f=pre_f, pre_b=pre_b):
      uf_ref[t0 + i, :] = window.silu(pre_f).astype(uf_ref.dtype)
      ub_ref[t0 + i, :] = window.silu(pre_b).astype(ub_ref.dtype)


def _backward_kernel(x_ref, *refs, consumers: int, length: int, taps: int, block_t: int, dtype, native: bool):
  """dx for positions t0 .. t0 + block_t, and this block's sums of the weight and bias gradients.

  refs: each consumer's du of the forward direction, then of the backward one (summed here, in the compute dtype),
  the weights, then the outputs. dL/d(pre-activation) is recomputed for s = t0 - (K-1) .. t0 + block_t + (K-1) (zero
  outside the sequence, where du reads as zero), then dx[t] = Σ_k w_f[k] dpre_f[t + (K-1) - k] + w_b[k]
  dpre_b[t - (K-1) + k]; the weight and bias gradients sum over this block's own positions only."""
  duf_refs, dub_refs, refs = refs[:consumers], refs[consumers : 2 * consumers], refs[2 * consumers :]
  *weight_refs, dx_ref, dwf_ref, dbf_ref, dwb_ref, dbb_ref = refs
  window = _Window(x_ref, weight_refs, length, taps, dtype, native)
  t0, half = pl.program_id(2) * block_t, taps - 1
  span = block_t + 2 * half  # positions s of dpre: t0 - half + i
  rows = [window.row(x_ref, t0 - 2 * half + k) for k in range(span + 2 * half)]  # x at s + k - half

  def du(du_refs, i):
    terms = [window.row(ref, t0 - half + i) for ref in du_refs]
    return sum(terms[1:], terms[0])

  du_f = [du(duf_refs, i) for i in range(span)]
  du_b = [du(dub_refs, i) for i in range(span)]
  dpre_f, dpre_b = [], []
  for i in range(span):
    pre_f, pre_b = window.pre(rows[i : i + 2 * half + 1])
    dpre_f.append(du_f[i] * window.silu_grad(pre_f))
    dpre_b.append(du_b[i] * window.silu_grad(pre_b))
  for j in range(block_t):  # dx[t0 + j]: dpre index of position t is t - t0 + half
    taps_f = [(w, dpre_f[j + 2 * half - k]) for k, w in enumerate(window.wf)]
    dx = window.sum_of_products(taps_f + [(v, dpre_b[j + k]) for k, v in enumerate(window.wb)], 0.0)

    @pl.when(t0 + j < length)
    def _store(j=j, dx=dx):
      dx_ref[t0 + j, :] = dx.astype(dx_ref.dtype)

  own = range(half, half + block_t)  # s = t0 .. t0 + block_t - 1; dpre is zero past the end
  for k in range(taps):
    dwf_ref[k, :] = window.sum_of_products(((dpre_f[i], rows[i + k]) for i in own), 0.0)
    dwb_ref[k, :] = window.sum_of_products(((dpre_b[i], rows[i + 2 * half - k]) for i in own), 0.0)
  dbf_ref[...] = sum(dpre_f[i] for i in own)
  dbb_ref[...] = sum(dpre_b[i] for i in own)


# Jitted: every layer's call shares one traced pair of kernels, lowered once. Module constants are read when it is
# first traced for a shape: after changing one, `jax.clear_caches()`.
@functools.partial(jax.jit, static_argnames=("interpret", "consumers"))
def fused(x, forward, backward, *, interpret: bool = False, consumers: int = 1):
  """The Pallas path: channels padded to the block, the kernels bound with `jax.custom_vjp`; the pair of outputs
  `consumers` times (`conv_silu_bidirectional`), each pair's cotangents read apart by the backward kernel. x may be a
  `Columns` window, which both kernels read in place where it is whole blocks of channels (in_proj's x: the conv
  then reads in_proj's output as it lies, and its gradient is the whole output's)."""
  batch, length, channels = x.shape
  taps = forward[0].shape[0]
  block_d = min(BLOCK_D, pl.next_power_of_2(channels))
  padded = pl.cdiv(channels, block_d) * block_d
  dtype = compute_dtype(x, *forward, *backward)
  native = ptx.native_for(dtype, interpret=interpret)  # exp, sigmoid and multiply-adds as PTX
  seq = pl.BlockSpec((None, length, block_d), lambda b, i, c: (b, 0, i))
  # A window of whole blocks is read in place (its blocks `first` on in the wider array); any other is sliced.
  first = x.first_block(block_d) if isinstance(x, Columns) else None
  x_spec = pl.BlockSpec((None, length, block_d), lambda b, i, c: (b, 0, i + (first or 0)))

  def x_operand(x):
    if first is not None:
      return x.array
    return pad_to(x.value() if isinstance(x, Columns) else x, 2, padded)

  weight_specs = [
    pl.BlockSpec((taps, block_d), lambda b, i, c: (0, i)),
    pl.BlockSpec((block_d,), lambda b, i, c: (i,)),
  ] * 2

  def call(kernel, block_t: int, **kwargs):
    """A pallas_call of `kernel` over (sequence, channel block, block of block_t positions)."""
    return pl.pallas_call(
      functools.partial(kernel, length=length, taps=taps, block_t=block_t, dtype=dtype, native=native),
      grid=(batch, padded // block_d, pl.cdiv(length, block_t)),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=max(1, block_d // 32), num_stages=1),
      **kwargs,
    )

  def pad_weights(weights):
    kernel, bias = weights
    return pad_to(kernel, 1, padded), pad_to(bias, 0, padded)

  @jax.custom_vjp
  def run(x, forward, backward):
    return run_fwd(x, forward, backward)[0]

  def run_fwd(x, forward, backward):
    weights = (*pad_weights(forward), *pad_weights(backward))
    u = call(
      _forward_kernel,
      FORWARD_BLOCK_T,
      in_specs=[x_spec, *weight_specs],
      out_specs=[seq, seq],
      out_shape=[jax.ShapeDtypeStruct((batch, length, padded), x.dtype)] * 2,
      name="conv_silu_fwd",
    )(x_operand(x), *weights)
    return tuple(v[..., :channels] for v in u) * consumers, (x, forward, backward)

  def run_bwd(residuals, cotangents):
    x, forward, backward = residuals
    weights = (*pad_weights(forward), *pad_weights(backward))
    sums = [  # one partial sum per program: (batch, position blocks, [taps,] channels)
      pl.BlockSpec((None, None, taps, block_d), lambda b, i, c: (b, c, 0, i)),
      pl.BlockSpec((None, None, block_d), lambda b, i, c: (b, c, i)),
    ] * 2
    blocks = pl.cdiv(length, BACKWARD_BLOCK_T)
    du = (*cotangents[0::2], *cotangents[1::2])  # each consumer's du of the forward direction, then the backward's
    dx, dwf, dbf, dwb, dbb = call(
      functools.partial(_backward_kernel, consumers=consumers),
      BACKWARD_BLOCK_T,
      in_specs=[x_spec, *[seq] * len(du), *weight_specs],
      out_specs=[seq, *sums],
      out_shape=[
        jax.ShapeDtypeStruct((batch, length, padded), x.dtype),
        *[jax.ShapeDtypeStruct((batch, blocks, *shape, padded), dtype) for shape in ((taps,), ())] * 2,
      ],
      name="conv_silu_bwd",
    )(x_operand(x), *(pad_to(d, 2, padded) for d in du), *weights)

    def total(grad, like):
      return grad.sum(axis=(0, 1))[..., :channels].astype(like.dtype)

    grads_f = total(dwf, forward[0]), total(dbf, forward[1])
    grads_b = total(dwb, backward[0]), total(dbb, backward[1])
    dx = dx[..., :channels]
    return x.cotangent(dx) if isinstance(x, Columns) else dx, grads_f, grads_b

  run.defvjp(run_fwd, run_bwd)
  return run(x, forward, backward)
