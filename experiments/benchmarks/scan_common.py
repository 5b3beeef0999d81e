"""Shapes, inputs and timing shared by the selective-scan benchmarks."""

import functools
import json
import time

import jax
import jax.numpy as jnp

from kernels import Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import pallas_gpu

CASES = {
  "224_b128": (128, 197),
  "224s8_b128": (128, 730),
  "512_b128": (128, 1025),
  "736_b64": (64, 2117),
  "1024_b32": (32, 4097),
  "1248_b32": (32, 6085),
  "1248_b8": (8, 6085),
  "1248_b1": (1, 6085),
}
CHANNELS, STATE = 384, 16


def make_inputs(batch: int, length: int, dtype, seed: int) -> dict:
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


def scan_fn(impl: str):
  def scan(x):
    return selective_scan(
      x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True, impl=impl
    )

  return scan


def bidirectional_fn(impl: str, *, fused: bool):
  """Both directions and the combine on a pair of `make_inputs` dicts (z from the first): through
  `selective_scan_bidirectional` if `fused`, else two `selective_scan` calls and the combine in XLA."""

  def scan(pair):
    z = pair[0]["z"]
    forward, backward = (Direction(*(x[k] for k in Direction._fields)) for x in pair)
    if fused:
      return selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl=impl)
    ys = [
      selective_scan(*d[:5], d.D, z, d.delta_bias, delta_softplus=True, reverse=r, impl=impl).astype(jnp.float32)
      for d, r in ((forward, False), (backward, True))
    ]
    return ((ys[0] + ys[1]) / 2).astype(z.dtype)

  return scan


def time_call(fn, make_inputs_for_seed, reps: int) -> float:
  """Seconds per call of `fn`: `reps` calls queued back to back (cycling over 4 fresh input sets, so
  caches do not help), timed to the last result, so host dispatch overlaps the device work."""
  inputs = [make_inputs_for_seed(seed) for seed in range(min(reps, 4))]
  jax.block_until_ready([fn(x) for x in inputs])
  start = time.perf_counter()
  jax.block_until_ready([fn(inputs[i % len(inputs)]) for i in range(reps)])
  return (time.perf_counter() - start) / reps


def copy_bandwidth() -> float:
  """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
  x = jnp.ones((2**28,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0000001)
  seconds = time_call(lambda _: copy(x), lambda seed: None, 10)
  return 2 * x.nbytes / seconds


def compare_forwards(
  cases: list[str], variants: dict, reps: int, out: str | None, *, bidirectional: bool = False
) -> list[dict]:
  """Time the Triton forward, what `selective_scan` ships (the Mosaic GPU forward where `mosaic_gpu.fits`, else the
  same Triton one) and each variant (name -> fn(u, delta, A, B, C, D, z, delta_bias) with delta_softplus and the
  gate; with `bidirectional`, name -> fn(forward Direction, backward Direction, z) of Vim's combined output, against
  the fused calls) at `cases` in bf16, with each one's largest error against the reference; a variant that fails is
  a row with its error. Prints each row as JSON and writes them all to `out`."""
  names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  rows = []
  for case in cases:
    batch, length = CASES[case]
    single = lambda seed, b=batch, n=length: make_inputs(b, n, jnp.bfloat16, seed)  # noqa: E731
    if bidirectional:
      make = lambda seed, single=single: (single(2 * seed), single(2 * seed + 1))  # noqa: E731
      shipped, reference = (bidirectional_fn(impl, fused=True) for impl in ("pallas_gpu", "reference"))
      call = lambda fn, x: fn(*(Direction(*(d[k] for k in Direction._fields)) for d in x), x[0]["z"])  # noqa: E731
      triton = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, one_pass=False)
    else:
      make, shipped, reference = single, scan_fn("pallas_gpu"), scan_fn("reference")
      call = lambda fn, x: fn(*(x[k] for k in names))  # noqa: E731
      triton = lambda *args: pallas_gpu.scan(*args, delta_softplus=True, one_pass=False)[0]  # noqa: E731
    x = make(0)
    expected = reference(x).astype(jnp.float32)
    candidates = {"triton": jax.jit(functools.partial(call, triton)), "shipped": jax.jit(shipped)}
    candidates |= {name: jax.jit(functools.partial(call, fn)) for name, fn in variants.items()}
    for name, fn in candidates.items():
      try:
        error = float(jnp.max(jnp.abs(fn(x).astype(jnp.float32) - expected)))
        row = {"case": case, "kernel": name, "fwd_ms": 1e3 * time_call(fn, make, reps), "max_abs_error": error}
      except Exception as e:  # a setting that does not compile is reported, not fatal
        row = {"case": case, "kernel": name, "error": str(e)[:300]}
      print(json.dumps(row), flush=True)
      rows.append(row)
  write_rows(out, rows)
  return rows


def write_rows(out: str | None, rows: list[dict]) -> None:
  """The rows to `out` as JSON, with the device and jax version that gave them (nothing if `out` is None)."""
  if out:
    with open(out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
