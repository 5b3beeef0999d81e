r"""The compiled Pallas GPU scan against the reference on the GPU itself (tests only run interpret mode).

  python experiments/checks/scan_gpu_check.py
  export JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1 XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      XLA_FLAGS=--xla_gpu_enable_command_buffer=
  python experiments/checks/scan_gpu_check.py --case=1   # compiles into the cache
  compute-sanitizer --tool memcheck python experiments/checks/scan_gpu_check.py --case=1
  compute-sanitizer --tool racecheck python experiments/checks/scan_gpu_check.py --case=3 --bidirectional_only
  python experiments/checks/scan_gpu_check.py --tiles   # every forward pass as tiles, as at 1248², batch 32
  python experiments/checks/scan_gpu_check.py --mosaic  # the Mosaic GPU forward (Hopper), as pallas_gpu runs it
  python experiments/checks/scan_gpu_check.py --mosaic_backward  # the Mosaic GPU gradient kernel (Hopper)
  python experiments/checks/scan_gpu_check.py --mosaic_backward --mosaic_options='{"shared_bc": true}'  # a candidate
  python experiments/checks/scan_gpu_check.py --mosaic --mosaic_options='{"scatter_sums": true}'  # a candidate
  compute-sanitizer --tool racecheck python experiments/checks/scan_gpu_check.py --mosaic --case=0
  compute-sanitizer --tool memcheck python experiments/checks/scan_gpu_check.py --mosaic --case=0 --only="3 chunks"

Forward (y, last state) and the gradients of all eight arrays, both directions, and the fused
bidirectional scan with its gradients (A also as `NegativeExp`) and without them (its inference path, which
writes y over its inputs), on shapes that exercise short last chunks, partial sub-chunks, padded channels
and several chunks (`--case=i` runs one of them, to keep sanitizer runs short). `--mosaic` checks the Mosaic GPU
one-pass forward instead, with the options `pallas_gpu` runs it with (`mosaic_gpu.OPTIONS`), whole and in 3 chunks,
B and C also read in place from one array as x_proj writes them, on `MOSAIC_CASES`: `pallas_gpu` calls it only for
long sequences, which none of `CASES` is. `--mosaic_backward` checks `mosaic_gpu_backward.gradients` (one ungated
direction each way) on `MOSAIC_BACKWARD_CASES`.
Prints the worst relative error per case and exits non-zero above the tolerance. With the platform
allocator every buffer is its own allocation, so compute-sanitizer sees any access past one; command
buffers (CUDA graphs) are off so that every kernel launch is its own. XLA's compiler crashes under the
sanitizer (segmentation fault, jax 0.11.2), so the sanitized run loads the executables that a plain run
left in the persistent compilation cache.
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.checks.gpu_check import Tally
from kernels import Direction, NegativeExp, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import mosaic_gpu, mosaic_gpu_backward, pallas_gpu
from kernels.selective_scan.columns import Columns

_CASE = flags.DEFINE_integer("case", None, "Index into CASES to run only that case (default: all).")
_BIDIRECTIONAL_ONLY = flags.DEFINE_bool(
  "bidirectional_only", False, "Run only the fused bidirectional scans (shorter sanitizer runs)."
)
_MOSAIC = flags.DEFINE_bool("mosaic", False, "Check the Mosaic GPU one-pass forward on MOSAIC_CASES instead.")
_MOSAIC_OPTIONS = flags.DEFINE_string(
  "mosaic_options",
  "{}",
  "With --mosaic, JSON that updates mosaic_gpu.OPTIONS (a candidate before it ships); with --mosaic_backward,"
  " keyword arguments of mosaic_gpu_backward.gradients.",
)
_MOSAIC_BACKWARD = flags.DEFINE_bool(
  "mosaic_backward", False, "Check the Mosaic GPU gradient kernel (mosaic_gpu_backward) on MOSAIC_BACKWARD_CASES."
)
_ONLY = flags.DEFINE_string("only", "", "Run only the forms whose name contains this text (e.g. 'gated', '3 chunks').")
_TILES = flags.DEFINE_bool(
  "tiles", False, "Run every forward pass as (channels, state) tiles, the layout used where programs are many."
)

# (batch, length, channels, state, dtype): odd and long lengths, channels off the 32-block, bf16 I/O.
CASES = [
  (2, 1, 3, 2, jnp.float32),
  (2, 197, 40, 16, jnp.float32),
  (1, 300, 384, 16, jnp.bfloat16),
  (2, 777, 64, 16, jnp.float32),
]
# A last block of 40 positions (of 64; in 3 chunks, of 6, 6 and 4 blocks) and the 1248² length; bf16 and state 16,
# as mosaic_gpu.fits asks.
MOSAIC_CASES = [
  (2, 1000, 64, 16, jnp.bfloat16),
  (1, 6085, 384, 16, jnp.bfloat16),
]
# Last blocks of 4 and 5 of 8 positions (walked first in reverse), the second at Vim-Ti's 224² length and channels.
MOSAIC_BACKWARD_CASES = [
  (2, 100, 64, 16, jnp.bfloat16),
  (2, 197, 384, 16, jnp.bfloat16),
]
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def _inputs(key, batch, length, channels, state, dtype):
  keys = jax.random.split(key, 9)
  seq = (batch, length, channels)
  return {
    "u": jax.random.normal(keys[0], seq, dtype),
    "delta": (0.5 * jax.random.normal(keys[1], seq)).astype(dtype),
    "A": -jnp.exp(jnp.log(jnp.arange(1.0, state + 1)) + 0.3 * jax.random.normal(keys[2], (channels, state))),
    "B": jax.random.normal(keys[3], (batch, length, state), dtype),
    "C": jax.random.normal(keys[4], (batch, length, state), dtype),
    "D": 1 + 0.5 * jax.random.normal(keys[5], (channels,)),
    "z": jax.random.normal(keys[6], seq, dtype),
    "delta_bias": jnp.log(jnp.expm1(jax.random.uniform(keys[7], (channels,), minval=0.02, maxval=0.22))),
  }, jax.random.normal(keys[8], seq, dtype)


def _run(impl, arrays, weights, reverse):
  def loss(arrays):
    y, last = selective_scan(**arrays, delta_softplus=True, reverse=reverse, return_last_state=True, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(jnp.sin(last)), (y, last)

  (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(arrays)
  return outputs, grads


def _run_bidirectional(impl, arrays, weights, negative_exp=False, differentiated=True):
  """Both directions on different inputs (the second's u, delta, B, C rolled by one position); with
  `negative_exp`, A as `NegativeExp(log(-A))`, which the kernels exponentiate themselves. (y, gradients), or y
  alone if not `differentiated`."""

  def loss(arrays):
    rolled = {k: jnp.roll(arrays[k], 1, axis=1) for k in ("u", "delta", "B", "C")}
    forward = Direction(*(arrays[k] for k in Direction._fields))
    if negative_exp:
      forward = forward._replace(A=NegativeExp(jnp.log(-forward.A)))
    backward = forward._replace(**rolled)
    y = selective_scan_bidirectional(forward, backward, arrays["z"], delta_softplus=True, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * weights), y

  if not differentiated:  # the inference path: no residuals kept, y written over delta and the partner
    return jax.jit(lambda arrays: loss(arrays)[1])(arrays)
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(arrays)
  return y, grads


def _pallas_gpu_runs(arrays, weights) -> dict:
  """`pallas_gpu`'s scans: each direction alone (unless --bidirectional_only) and the fused bidirectional call with
  and without gradients, as {what: run(impl)}."""
  runs = {f"reverse={reverse}": functools.partial(_run, arrays=arrays, weights=weights, reverse=reverse)
          for reverse in (False, True) if not _BIDIRECTIONAL_ONLY.value}  # fmt: skip
  runs["bidirectional"] = functools.partial(_run_bidirectional, arrays=arrays, weights=weights)
  runs["bidirectional, NegativeExp"] = functools.partial(
    _run_bidirectional, arrays=arrays, weights=weights, negative_exp=True
  )
  runs["bidirectional, inference"] = functools.partial(
    _run_bidirectional, arrays=arrays, weights=weights, differentiated=False
  )
  return runs


def _mosaic_runs(arrays) -> dict:
  """The Mosaic GPU forward with the options `pallas_gpu` runs it with: both directions (in place or not, and in
  chunks) and one gated direction each way with its last state (whole and in chunks), as {what: run(impl)}, impl
  "mosaic_gpu" or "reference"."""
  rolled = {k: jnp.roll(arrays[k], 1, axis=1) for k in ("u", "delta", "B", "C")}
  forward = Direction(*(arrays[k] for k in Direction._fields))
  backward = forward._replace(**rolled)

  candidate = json.loads(_MOSAIC_OPTIONS.value)

  def windows(direction: Direction) -> Direction:
    """B and C as `Columns` of one [step | B | C] array, as the model passes x_proj's output."""
    projected = jnp.concatenate([direction.delta[..., : direction.B.shape[-1]], direction.B, direction.C], axis=-1)
    state = direction.B.shape[-1]
    return direction._replace(B=Columns(projected, state, state), C=Columns(projected, 2 * state, state))

  def bidirectional(impl, in_place, chunks=1, in_windows=False):
    if impl == "reference":
      return selective_scan_bidirectional(forward, backward, arrays["z"], delta_softplus=True, impl=impl)
    options = dict(mosaic_gpu.OPTIONS, **candidate, in_place=in_place, chunks=chunks)
    pair = (windows(forward), windows(backward)) if in_windows else (forward, backward)
    return jax.jit(functools.partial(mosaic_gpu.bidirectional, **options))(*map(tuple, pair), arrays["z"])

  def one_direction(impl, reverse, chunks=1):
    """y and the last state, as `pallas_gpu.scan` takes them without gradients."""
    if impl == "reference":
      y, last = selective_scan(**arrays, delta_softplus=True, reverse=reverse, return_last_state=True, impl=impl)
    else:
      args = [arrays[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
      options = dict(mosaic_gpu.SINGLE_OPTIONS, **candidate, reverse=reverse, last_state=True, chunks=chunks)
      y, last = jax.jit(functools.partial(mosaic_gpu.forward, **options))(*args)
    return {"y": y, "last_state": last}

  return {
    "bidirectional": functools.partial(bidirectional, in_place=False),
    "bidirectional, in place": functools.partial(bidirectional, in_place=True),
    "bidirectional, in place, 3 chunks": functools.partial(bidirectional, in_place=True, chunks=3),
    "bidirectional, in place, B and C windows": functools.partial(bidirectional, in_place=True, in_windows=True),
    "bidirectional, in place, 3 chunks, B and C windows": functools.partial(
      bidirectional, in_place=True, chunks=3, in_windows=True
    ),
    **{
      f"gated, reverse={r}{', 3 chunks' if chunks > 1 else ''}": functools.partial(
        one_direction, reverse=r, chunks=chunks
      )
      for r in (False, True)
      for chunks in (1, 3)
    },
  }


def _mosaic_backward_runs(arrays, weights) -> dict:
  """The gradients of one ungated direction against the cotangent `weights`, each way, with each of the kernel's
  ways to sum dB and dC over channels and the options in --mosaic_options, as {what: run(impl)}, impl "mosaic_gpu"
  (`mosaic_gpu_backward.gradients`) or "reference"."""
  names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
  args = [arrays[k] for k in names]

  def gradients(impl, reverse, channel_sums):
    if impl == "reference":

      def scan(u, delta, A, B, C, D, delta_bias):
        return selective_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus=True, reverse=reverse, impl=impl)

      grads = jax.vjp(scan, *args)[1](weights)
    else:
      options = dict(json.loads(_MOSAIC_OPTIONS.value), reverse=reverse, channel_sums=channel_sums)
      grads = jax.jit(functools.partial(mosaic_gpu_backward.gradients, **options))(*args, weights)
    return dict(zip(names, grads, strict=True))

  return {
    f"reverse={reverse}, {sums} sums": functools.partial(gradients, reverse=reverse, channel_sums=sums)
    for reverse in (False, True)
    for sums in mosaic_gpu_backward.CHANNEL_SUMS
  }


def main(argv) -> int:
  del argv
  if _TILES.value:
    pallas_gpu.BY_CHANNEL_PROGRAMS = 0
  tally = Tally()
  short = functools.partial(jax.tree.map, lambda e: f"{e:.1e}")
  mosaic = _MOSAIC.value or _MOSAIC_BACKWARD.value
  case_list = MOSAIC_BACKWARD_CASES if _MOSAIC_BACKWARD.value else MOSAIC_CASES if _MOSAIC.value else CASES
  cases = range(len(case_list)) if _CASE.value is None else [_CASE.value]
  for i in cases:
    batch, length, channels, state, dtype = case_list[i]
    arrays, weights = _inputs(jax.random.key(i), batch, length, channels, state, dtype)
    if _MOSAIC_BACKWARD.value:
      runs = _mosaic_backward_runs(arrays, weights)
    else:
      runs = _mosaic_runs(arrays) if _MOSAIC.value else _pallas_gpu_runs(arrays, weights)
    for what, run in runs.items():
      if _ONLY.value not in what:
        continue
      errors, worst = tally.compare(run("mosaic_gpu" if mosaic else "pallas_gpu"), run("reference"), TOLERANCE[dtype])
      name = f"b{batch} l{length} d{channels} n{state} {jnp.dtype(dtype).name} {what}"
      parts = f"; outputs {short(errors[0])}; grads {short(errors[1])}" if isinstance(errors, tuple) else ""
      print(f"{name}: worst relative error {worst:.2e}{parts}")
  return tally.verdict()


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
