r"""A forward of the scan that runs positions in parallel (Pallas Triton `tt.scan`), timed against the shipped kernel.

  PYTHONPATH=. python experiments/benchmarks/scan_positions_parallel.py \
      --out=experiments/results/scan_positions_parallel_h200.json

Why. The shipped kernels give each thread 16 state elements of one sequence and walk its positions one at a
time, so a sequence's parallelism is its channels × state. At 1248², batch 32, that is 384 one-warp programs
for 132 SMs: too few, so long sequences are split into chunks and the forward passes twice, computing every
exp twice (the eleventh session's arithmetic). The official CUDA kernel instead scans positions across the
threads of a block, once. This kernel does the same in Pallas Triton: each program owns `block_d` channels of
one sequence and walks it in blocks of `block_t` positions; per block it builds the (state, block_t, block_d)
decays a = exp(delta A) and inputs b = delta u B, combines them along positions with the linear recurrence's
associative operator (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2) as one Triton `tt.scan`, adds the carried
state times the cumulative decay and sums y = <h, C> + D u, gated by silu(z). One pass, each exp once, and
batch × channels / block_d programs of several warps each.

How. Pallas has no public two-operand scan: `linear_recurrence_p` is a primitive of this file whose Triton
lowering is jax's own `_associative_scan_lowering` (private; the one behind `jnp.cumsum`, present in jax 0.11.2
and 0.12) and whose other lowerings (interpret mode) are `lax.associative_scan`. A last block that would run
past the sequence starts at length - block_t instead and treats the positions already done as identity steps
(a = 1, b = 0), which it does not store: no access leaves the arrays (jax 0.11.2 does not mask overhanging
blocks) and interpret mode sees only whole blocks. Forward direction only, no backward, no last state: it
answers "is this faster at long sequences", not "ship it".

Offline (`kernel_registers.py`'s compile of the Triton IR, triton 3.5.1, sm_90, 1248², batch 32, bf16), SASS
instructions per state element in the main loop, against about 14 in the shipped forward's (which makes two
passes over chunked sequences): 41 at block_t 8, block_d 32, 4 warps (159 registers, 12 warps per SM) and at
16, 32, 4 (247, 8); 49 at 16, 16, 4 (193, 8). The scan's exchanges go through shared memory (about 250 LDS
per 32 elements). The scan alone, without softplus, D or the gate, and state last: 20 per element, 80
registers. So this is not a clear win by instruction count; it wins only if the parallelism pays, which
needs a GPU to tell.

Measured (H200, fourteenth session, `scan_positions_parallel_h200.json`): slower everywhere. The best tiling
takes 2.39 against 1.53 ms at 1248², batch 32, 0.30 against 0.14 at 224², batch 128, and 1.18 against 0.20 ms
even at one 1248² image, where the shipped kernel has the fewest programs.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax._src.pallas.triton.lowering as triton_lowering  # private: the two-operand scan's lowering
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.extend import core as jex_core
from jax.interpreters import mlir

from experiments.benchmarks.scan_common import compare_forwards
from kernels.selective_scan.padding import compute_dtype
from kernels.selective_scan.softplus import softplus


def _combine(earlier, later):
  """The linear recurrence h_t = a_t h_{t-1} + b_t as an associative operator on (a, b) pairs."""
  (a1, b1), (a2, b2) = earlier, later
  return a1 * a2, a2 * b1 + b2


def _scan_along(a, b, *, axis: int):
  return list(jax.lax.associative_scan(_combine, (a, b), axis=axis))


linear_recurrence_p = jex_core.Primitive("linear_recurrence")
linear_recurrence_p.multiple_results = True
linear_recurrence_p.def_impl(_scan_along)
linear_recurrence_p.def_abstract_eval(lambda a, b, *, axis: [a, b])
mlir.register_lowering(linear_recurrence_p, mlir.lower_fun(_scan_along, multiple_results=True))


@triton_lowering.register_lowering(linear_recurrence_p)
def _linear_recurrence_triton(ctx, a, b, *, axis: int):
  return triton_lowering._associative_scan_lowering(_combine, ctx, (a, b), (axis,))


def linear_recurrence(a: jax.Array, b: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
  """(cumulative products of a, states h with h_{-1} = 0) along `axis`."""
  return tuple(linear_recurrence_p.bind(a, b, axis=axis))


def _forward_kernel(u_ref, delta_ref, z_ref, b_ref, c_ref, a_ref, d_ref, bias_ref, y_ref, *, length, block_t, dtype):
  """One sequence's block of channels, in blocks of positions. The tiles are (state, position, channel): with
  the state axis first, Triton computes the per-channel math (softplus, the gate) once per (position, channel)
  and not once per state element, which it did with the state last (72 against 41 instructions per element,
  offline)."""
  a_log2 = (a_ref[...].astype(dtype) * math.log2(math.e)).T  # (state, block_d)
  skip, bias = d_ref[...].astype(dtype), bias_ref[...].astype(dtype)
  offsets = jax.lax.broadcasted_iota(jnp.int32, (block_t,), 0)

  def block(k, h):
    start = jnp.minimum(k * block_t, length - block_t)  # the last block ends at the sequence's end
    fresh = start + offsets >= k * block_t  # positions an earlier block has not done
    rows = pl.ds(start, block_t)
    load = lambda ref: ref[rows, :].astype(dtype)  # noqa: E731
    u, z, b_t, c_t = load(u_ref), load(z_ref), load(b_ref).T, load(c_ref).T  # B, C: (state, block_t)
    delta = jnp.where(fresh[:, None], softplus(load(delta_ref) + bias), 0.0)  # 0: an identity step
    decay = jnp.exp2(delta[None] * a_log2[:, None, :])  # (state, block_t, block_d)
    cumulative, states = linear_recurrence(decay, (delta * u)[None] * b_t[:, :, None], axis=1)
    states = states + cumulative * h[:, None, :]
    y = jnp.sum(states * c_t[:, :, None], axis=0) + skip * u
    plgpu.store(y_ref.at[rows, :], (y * jax.nn.sigmoid(z) * z).astype(y_ref.dtype), mask=fresh[:, None])
    last = jax.lax.broadcasted_iota(jnp.int32, states.shape, 1) == block_t - 1
    return jnp.sum(jnp.where(last, states, 0.0), axis=1)

  jax.lax.fori_loop(0, pl.cdiv(length, block_t), block, jnp.zeros(a_log2.shape, dtype))


def forward(u, delta, A, B, C, D, z, delta_bias, *, block_t=16, block_d=16, num_warps=4, interpret=False):
  """y of the selective scan with delta_softplus and the z gate, for (batch, length, channels) inputs; float32
  math (float64 if an input is)."""
  batch, length, channels = u.shape
  state = A.shape[1]
  if channels % block_d or length < block_t:
    raise ValueError(f"channels ({channels}) must be a multiple of block_d ({block_d}) and length ({length}) at "
                     f"least block_t ({block_t})")  # fmt: skip
  seq = pl.BlockSpec((None, length, block_d), lambda b, i: (b, 0, i))
  per_state = pl.BlockSpec((None, length, state), lambda b, i: (b, 0, 0))
  channel = pl.BlockSpec((block_d,), lambda b, i: (i,))
  return pl.pallas_call(
    functools.partial(_forward_kernel, length=length, block_t=block_t, dtype=compute_dtype(u, delta, A, B, C, D, z)),
    grid=(batch, channels // block_d),
    in_specs=[
      seq,
      seq,
      seq,
      per_state,
      per_state,
      pl.BlockSpec((block_d, state), lambda b, i: (i, 0)),
      channel,
      channel,
    ],
    out_specs=seq,
    out_shape=jax.ShapeDtypeStruct(u.shape, u.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    interpret=interpret,
    name="selective_scan_positions_parallel",
  )(u, delta, z, B, C, A, D, delta_bias)


def main(argv):
  del argv
  options = flags.FLAGS
  variants = {
    f"positions block_t={t} block_d={d} warps={w}": functools.partial(
      forward, block_t=int(t), block_d=int(d), num_warps=int(w)
    )
    for t, d, w in itertools.product(options.block_t, options.block_d, options.num_warps)
  }
  compare_forwards(options.cases, variants, options.reps, options.out)


if __name__ == "__main__":
  # Defined here, not at import: the tests import this module beside scan_mosaic_gpu, whose flags share names.
  flags.DEFINE_list("cases", ["224_b128", "1248_b8", "1248_b32", "1248_b1"], "Shapes (scan_common.CASES).")
  flags.DEFINE_list("block_t", ["8", "16"], "Positions per scanned block.")
  flags.DEFINE_list("block_d", ["16", "32"], "Channels per program.")
  flags.DEFINE_list("num_warps", ["2", "4"], "Warps per program.")
  flags.DEFINE_integer("reps", 30, "Timed calls per setting.")
  flags.DEFINE_string("out", None, "JSON file for the results.")
  app.run(main)
