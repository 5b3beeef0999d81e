"""Selective scan forward as a Pallas GPU kernel on the Triton backend; gradients via `xla.scan`.

Triton rather than Mosaic GPU (the backend Pallas is moving to): the scan is a sequential recurrence
over length with a small per-channel state, which Triton expresses as one loop over values held in
registers, with no shared-memory pipeline or warpgroup code to write; and it runs on jax 0.11 and 0.12
(deprecated there since 0.11: lowering warns, so a Mosaic GPU port is due before it is removed).

Each program owns `block_d` channels of one sequence and all of their state, (block_d, state) floats
in registers, and walks the length one position at a time: the (batch, length, channels, state) states
never touch HBM. Triton tensors need power-of-two sizes, so channels are zero-padded to a multiple of
`block_d` and state to a power of two (A = B = C = 0 there keeps padded entries at h = 0 and out of y);
length is only a loop bound, so any length works without padding.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.selective_scan.autodiff import with_xla_backward

# Untuned starting points (not benchmarked yet): 32 channels x 16 states is 512 floats of state, 8 per
# thread with 2 warps; Vim's 384 channels then give batch x 12 programs. Two stages may let Triton prefetch
# the next position's inputs while the current one computes.
BLOCK_D = 32
NUM_WARPS = 2
NUM_STAGES = 2


def _kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, y_ref, h_ref, *, length: int, reverse: bool):
  """One (sequence, channel block): refs are u/delta/y (length, block_d), B/C (length, state),
  A and the final state (block_d, state)."""
  A = A_ref[...]

  def step(i, h):
    t = length - 1 - i if reverse else i
    delta = delta_ref[t, :]
    drive = (delta * u_ref[t, :])[:, None] * B_ref[t, :][None, :]
    h = jnp.exp(delta[:, None] * A) * h + drive
    # Multiply-and-sum rather than a dot: Triton dots need 16-wide operands and may use TF32.
    y_ref[t, :] = jnp.sum(h * C_ref[t, :][None, :], axis=1)
    return h

  h_ref[...] = jax.lax.fori_loop(0, length, step, jnp.zeros_like(A))


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` along `axis` up to `size`; a no-op (no copy) when it is already that size."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


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
) -> tuple[jax.Array, jax.Array]:
  """The kernel alone (no autodiff rule): same contract as `reference.scan`; `block_d` channels
  (a power of two) per program."""
  batch, length, channels = u.shape
  state = A.shape[1]
  block_d = min(block_d, pl.next_power_of_2(channels))
  padded_channels = pl.cdiv(channels, block_d) * block_d
  padded_state = pl.next_power_of_2(state)
  u, delta = (_pad_to(x, 2, padded_channels) for x in (u, delta))
  B, C = (_pad_to(x, 2, padded_state) for x in (B, C))
  A = _pad_to(_pad_to(A, 0, padded_channels), 1, padded_state)

  seq_spec = pl.BlockSpec((None, length, block_d), lambda b, d: (b, 0, d))
  state_spec = pl.BlockSpec((None, length, padded_state), lambda b, d: (b, 0, 0))
  y, h_last = pl.pallas_call(
    functools.partial(_kernel, length=length, reverse=reverse),
    grid=(batch, padded_channels // block_d),
    in_specs=[seq_spec, seq_spec, pl.BlockSpec((block_d, padded_state), lambda b, d: (d, 0)), state_spec, state_spec],
    out_specs=[seq_spec, pl.BlockSpec((None, block_d, padded_state), lambda b, d: (b, d, 0))],
    out_shape=[
      jax.ShapeDtypeStruct((batch, length, padded_channels), u.dtype),
      jax.ShapeDtypeStruct((batch, padded_channels, padded_state), u.dtype),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES),
    interpret=interpret,
    name="selective_scan_fwd",
  )(u, delta, A, B, C)
  return y[..., :channels], h_last[:, :channels, :state]


_forward_with_xla_backward = with_xla_backward(forward)


def scan(
  u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, reverse: bool, interpret: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.scan`: forward by the Pallas kernel, gradients by `xla.scan`."""
  return _forward_with_xla_backward(u, delta, A, B, C, reverse=reverse, interpret=interpret)
