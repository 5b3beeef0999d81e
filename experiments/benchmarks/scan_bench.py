r"""Selective-scan timings at Vim-Ti shapes (channels 384, state 16): each impl against the byte floor.

  python experiments/benchmarks/scan_bench.py --impls=xla,pallas_gpu --out=experiments/results/scan_h100.json

One direction of one Vim layer, as the mixer calls it (D, z gate, delta_bias, softplus), forward and
forward+backward (gradients of all eight arrays), for bf16 and f32 I/O. The copy bandwidth is measured in
the same run; the byte floor is the HBM traffic a perfect kernel needs (read u, delta, z, B, C; write y)
over that bandwidth. Medians of --reps timed calls after warm-up; each call's inputs are fresh arrays.
Also prints each impl's forward error against the reference (f32 inputs).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels import selective_scan

_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas_gpu"], "Implementations to time.")
_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8", "1248_b1"], "Shapes (see CASES).")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "I/O dtypes.")
_REPS = flags.DEFINE_integer("reps", 20, "Timed repetitions.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")

CASES = {"224_b128": (128, 197), "224s8_b128": (128, 730), "1248_b8": (8, 6085), "1248_b1": (1, 6085)}
CHANNELS, STATE = 384, 16


def _inputs(batch: int, length: int, dtype, seed: int) -> dict:
  keys = jax.random.split(jax.random.key(seed), 8)
  shape = (batch, length, CHANNELS)
  return {
    "u": jax.random.normal(keys[0], shape, dtype),
    "delta": (0.5 * jax.random.normal(keys[1], shape)).astype(dtype),
    "A": -jnp.exp(
      jnp.log(jnp.arange(1, STATE + 1, dtype=jnp.float32)) + 0.3 * jax.random.normal(keys[2], (CHANNELS, STATE))
    ),
    "B": jax.random.normal(keys[3], (batch, length, STATE), dtype),
    "C": jax.random.normal(keys[4], (batch, length, STATE), dtype),
    "D": 1 + 0.5 * jax.random.normal(keys[5], (CHANNELS,)),
    "z": jax.random.normal(keys[6], shape, dtype),
    "delta_bias": jnp.log(jnp.expm1(jax.random.uniform(keys[7], (CHANNELS,), minval=0.02, maxval=0.22))),
  }


def _scan_fn(impl: str):
  def scan(x):
    return selective_scan(
      x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True, impl=impl
    )

  return scan


def _time(fn, make_inputs, reps: int) -> float:
  """Median seconds of `fn` over `reps` calls, each on its own fresh inputs (no cache reuse)."""
  inputs = [make_inputs(seed) for seed in range(min(reps, 4))]
  jax.block_until_ready(fn(inputs[0]))
  times = []
  for i in range(reps):
    x = inputs[i % len(inputs)]
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _copy_bandwidth() -> float:
  """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
  x = jnp.ones((2**28,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0000001)
  seconds = _time(lambda _: copy(x), lambda seed: None, 10)
  return 2 * x.nbytes / seconds


def main(argv):
  del argv
  device = jax.devices()[0]
  bandwidth = _copy_bandwidth()
  print(f"{device.device_kind}; jax {jax.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]
    reference = jax.jit(_scan_fn("reference"))(_inputs(batch, length, jnp.float32, 0))
    for impl in _IMPLS.value:
      y = jax.jit(_scan_fn(impl))(_inputs(batch, length, jnp.float32, 0))
      err = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
      for dtype_name in _DTYPES.value:
        dtype = jnp.dtype(dtype_name)
        make = lambda seed, b=batch, n=length, d=dtype: _inputs(b, n, d, seed)  # noqa: E731
        scan = _scan_fn(impl)
        forward = jax.jit(scan)
        weights = jax.random.normal(jax.random.key(9), (batch, length, CHANNELS), dtype)
        backward = jax.jit(jax.grad(lambda x, f=scan, w=weights: jnp.sum(f(x).astype(jnp.float32) * w)))
        fwd_s = _time(forward, make, _REPS.value)
        bwd_s = _time(backward, make, _REPS.value)
        tokens, item = batch * length, dtype.itemsize
        fwd_bytes = tokens * (4 * CHANNELS + 2 * STATE) * item  # read u, delta, z, B, C; write y
        row = {
          "case": case,
          "batch": batch,
          "length": length,
          "impl": impl,
          "dtype": dtype_name,
          "fwd_ms": 1e3 * fwd_s,
          "fwd_bwd_ms": 1e3 * bwd_s,
          "fwd_floor_ms": 1e3 * fwd_bytes / bandwidth,
          "fwd_over_floor": fwd_s / (fwd_bytes / bandwidth),
          "fwd_rel_err_f32": err,
        }
        rows.append(row)
        print(json.dumps(row))
  print(f"\n{device.device_kind}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  print("| case | impl | I/O | forward (ms) | fwd+bwd (ms) | fwd byte floor (ms) | fwd / floor | fwd error (f32) |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['case']} | {r['impl']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
      f"{r['fwd_floor_ms']:.3f} | {r['fwd_over_floor']:.1f} | {r['fwd_rel_err_f32']:.1e} |"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(
        {"device": device.device_kind, "jax": jax.__version__, "copy_bytes_per_s": bandwidth, "rows": rows}, f, indent=2
      )


if __name__ == "__main__":
  app.run(main)
