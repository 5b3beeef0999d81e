"""float32 exp, sigmoid and multiply-add as single PTX instructions in the Triton kernels; log1p in a few.

Nsight Compute on the forward as XLA builds it (H200, jax 0.11.2; the offline compile with the `triton`
package hid this) counted 300 instructions per position and warp at 224², batch 128, because:
- `jnp.exp2` becomes libdevice's `__nv_exp2f`, which keeps denormal results: a compare and two predicated
  multiplies around each `MUFU.EX2`, four instructions per decay where `ex2.approx.ftz.f32` is one. A decay
  below 2^-126 (1e-38) flushes to zero instead, a change no float32 tolerance sees;
- `jnp.exp` and the sigmoid's division become libdevice's exact `expf` and IEEE division, about ten
  instructions each, where `ex2.approx.ftz.f32` of x log2(e) and `rcp.approx.ftz.f32` are within two ulps;
- no multiply feeding an add is contracted: every `a * b + c` is an `FMUL` and an `FADD`, where `fma.rn.f32`
  is one instruction, and rounds once instead of twice.

With these the forward needs 214 instructions per position and takes 107 instead of 125 µs (ncu); Vim-Ti's
forward at 224², batch 128, 9.58 -> 8.78 ms and its training step 42.2 -> 40.1 ms (H200,
experiments/results/README.md, fourteenth session). Interpret mode and float64 take the jnp forms: inline PTX
only runs on an NVIDIA GPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def native_for(dtype, *, interpret: bool) -> bool:
  """Whether a kernel computing in `dtype` takes the PTX forms: compiled (not interpret mode) float32 only."""
  return not interpret and jnp.dtype(dtype) == jnp.float32


def exp2(x: jax.Array, *, native: bool) -> jax.Array:
  """2**x; with `native`, the hardware's approximate ex2 with denormals flushed."""
  if not native:
    return jnp.exp2(x)
  return _asm("ex2.approx.ftz.f32 $0, $1;", x)


def exp(x: jax.Array, *, native: bool) -> jax.Array:
  """e**x; with `native`, as the hardware's ex2 of x log2(e)."""
  return exp2(x * math.log2(math.e), native=True) if native else jnp.exp(x)


def log1p(y: jax.Array, *, native: bool) -> jax.Array:
  """log(1 + y) for y >= 0 (softplus's log1p(exp(x))). With `native`, libdevice's `log1pf` (range reduction,
  a degree-9 polynomial and a branch for special values: 34 instructions per position of the forward, a
  sixth of its loop in SASS) gives way to `_log1p_pieces` with the hardware's approximate lg2."""
  if not native:
    return jnp.log1p(y)
  return _log1p_pieces(y, lambda u: _asm("lg2.approx.ftz.f32 $0, $1;", u), functools.partial(fma, native=True))


# Below this, log1p's series to its 7th power is within 6e-8 relative (the next term over y: y^7 / 8); above,
# log1p(y) >= 0.118, so rounding 1 + y costs at most 6e-7 of it and lg2's absolute error (about 2^-22) 1.5e-6.
_LOG1P_SERIES_BELOW = 0.125


def _log1p_pieces(y, log2, fma):
  """log(1 + y) for y >= 0 as y (1 - y/2 + y²/3 - ... + y⁶/7) below `_LOG1P_SERIES_BELOW`, else log2(1 + y) ln 2:
  about a dozen instructions with the select, one of them the MUFU's lg2, given log2 and a multiply-add."""
  series = 1.0 / 7.0
  for k in range(6, 0, -1):
    series = fma(series, y, (-1.0) ** (k + 1) / k)
  return jnp.where(y < _LOG1P_SERIES_BELOW, series * y, log2(1.0 + y) * math.log(2.0))


def sigmoid(x: jax.Array, *, native: bool) -> jax.Array:
  """1 / (1 + e**-x); with `native`, the reciprocal is the hardware's approximate one (0 where e**-x is inf)."""
  if not native:
    return jax.nn.sigmoid(x)
  return _asm("rcp.approx.ftz.f32 $0, $1;", 1.0 + exp(-x, native=True))


def silu(x: jax.Array, *, native: bool) -> jax.Array:
  """x sigmoid(x)."""
  return x * sigmoid(x, native=native)


def fma(a: jax.Array, b: jax.Array, c: jax.Array, *, native: bool) -> jax.Array:
  """a * b + c, broadcast; with `native`, one fused multiply-add."""
  if not native:
    return a * b + c
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
  a, b, c = (jnp.float32(x) if isinstance(x, float) else x for x in (a, b, c))  # a Python 0.0 start
  return _asm("fma.rn.f32 $0, $1, $2, $3;", *(jnp.broadcast_to(x, shape) for x in (a, b, c)))


def sum_of_products(pairs, start, *, native: bool) -> jax.Array:
  """start + Σ a b over (a, b) in `pairs`, as a chain of `fma`s."""
  total = start
  for a, b in pairs:
    total = fma(a, b, total, native=native)
  return total


def _asm(asm: str, *args: jax.Array) -> jax.Array:
  """One float32 PTX instruction applied elementwise to same-shaped float32 arguments."""
  if any(x.dtype != jnp.float32 for x in args):
    raise TypeError(f"ptx: {asm!r} takes float32 arguments, got {[str(x.dtype) for x in args]}")
  constraints = ",".join(["=f"] + ["f"] * len(args))
  (result,) = plgpu.elementwise_inline_asm(
    asm, args=list(args), constraints=constraints, pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct.like(args[0])]
  )
  return result
