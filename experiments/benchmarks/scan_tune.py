r"""Sweeps the Pallas GPU scan's launch parameters at Vim-Ti shapes, bf16 I/O, all options on.

  PYTHONPATH=. python experiments/benchmarks/scan_tune.py --out=experiments/results/scan_tune_h100.json

Times forward and forward+backward (as `scan_bench.py` does) for every combination of channels per
program, warps, positions per chunk and the backward's and forward's sub-chunks; prints the best of each case.
"""

import itertools
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import CASES, CHANNELS, make_inputs, time_call
from kernels.selective_scan import pallas_gpu

_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8"], "Shapes (scan_bench.CASES).")
_BLOCK_D = flags.DEFINE_list("block_d", ["16", "32", "64"], "Channels per program.")
_WARPS = flags.DEFINE_list("num_warps", ["1", "2", "4"], "Warps per program.")
_CHUNKS = flags.DEFINE_list("max_chunk", ["256"], "Positions per program at most.")
_SUB_CHUNKS = flags.DEFINE_list("sub_chunk", ["2", "4"], "Positions per state the backward keeps.")
_FORWARD_SUB_CHUNKS = flags.DEFINE_list("forward_sub_chunk", ["4"], "Positions the forward loads ahead.")
_REPS = flags.DEFINE_integer("reps", 30, "Timed calls per setting.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _scan(options: dict):
  def scan(x):
    args = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    return pallas_gpu.scan(*args, delta_softplus=True, **options)[0]

  return scan


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  print(f"{device}; jax {jax.__version__}")
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]
    make = lambda seed, b=batch, n=length: make_inputs(b, n, jnp.bfloat16, seed)  # noqa: E731
    weights = jax.random.normal(jax.random.key(9), (batch, length, CHANNELS), jnp.bfloat16)
    grid = itertools.product(_BLOCK_D.value, _WARPS.value, _CHUNKS.value, _SUB_CHUNKS.value, _FORWARD_SUB_CHUNKS.value)
    for block_d, warps, chunk, sub, forward_sub in grid:
      options = dict(
        block_d=int(block_d), num_warps=int(warps), max_chunk=int(chunk), sub_chunk=int(sub),
        forward_sub_chunk=int(forward_sub),
      )  # fmt: skip
      scan = _scan(options)
      loss = lambda x, f=scan, w=weights: jnp.sum(f(x).astype(jnp.float32) * w)  # noqa: E731
      try:
        fwd = time_call(jax.jit(scan), make, _REPS.value)
        fwd_bwd = time_call(jax.jit(jax.value_and_grad(loss)), make, _REPS.value)  # the value keeps y alive
      except Exception as e:  # a setting Triton cannot compile (e.g. out of registers) is reported, not fatal
        print(json.dumps({"case": case, **options, "error": str(e)[:200]}))
        continue
      row = {"case": case, **options, "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * fwd_bwd}
      rows.append(row)
      print(json.dumps(row), flush=True)
  for case in _CASES.value:
    mine = [r for r in rows if r["case"] == case]
    for key in ("fwd_ms", "fwd_bwd_ms"):
      best = min(mine, key=lambda r: r[key])
      print(f"{device} {case}: best {key} {best[key]:.3f}: {best}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
