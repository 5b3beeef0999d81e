r"""The Mosaic GPU gradient kernel of one ungated direction, checked and timed against the Triton backward that ships.

  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_backward.py --cases=224_b128,1248_b8 --block_t=8,16 \
      --out=experiments/results/scan_mosaic_backward_h100.json

Per case (`scan_common.CASES`, Vim-Ti's channels and state, bf16): the Triton forward alone, Triton's forward+backward
(`jax.vjp` of `selective_scan(..., impl="pallas_gpu")` without z), and `mosaic_gpu_backward.gradients` alone, in ms;
the backward is the second less the first. Each array's gradient from the Mosaic kernel is compared with Triton's and
with XLA's float32 scan on the same bf16 inputs (largest difference over the largest magnitude of XLA's), both
directions.
"""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import CASES, make_inputs, time_call, write_rows
from kernels import selective_scan
from kernels.selective_scan import mosaic_gpu_backward

_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8"], "Shapes (scan_common.CASES).")
_BLOCK_T = flags.DEFINE_list("block_t", ["8", "16"], "Positions per block of the Mosaic kernel.")
_CHANNEL_SUMS = flags.DEFINE_list(
  "channel_sums", ["shuffles"], "How dB and dC are summed over channels: shuffles, pallas (one or both)."
)
_SHARED_STEPS = flags.DEFINE_list("shared_steps", ["1"], "0, 1 or both: step sizes once per (position, channel).")
_SHARED_BC = flags.DEFINE_list("shared_bc", ["0"], "0, 1 or both: B and C converted to float32 once per block.")
_KEEP_STEPS = flags.DEFINE_list("keep_steps", ["1"], "0, 1 or both: u and step sizes kept in registers for it.")
_AUTO_BARRIERS = flags.DEFINE_list("auto_barriers", ["0"], "0, 1 or both: Pallas's barriers around shared stores.")
_REPS = flags.DEFINE_integer("reps", 50, "Calls per timing.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")

_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _with_cotangent(batch: int, length: int, seed: int) -> dict:
  x = make_inputs(batch, length, jnp.bfloat16, seed)
  return x | {"dy": jax.random.normal(jax.random.key(seed + 100), x["u"].shape, jnp.bfloat16)}


def _scan(impl: str, reverse: bool):
  def scan(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus=True, reverse=reverse, impl=impl)

  return scan


def _vjp(impl: str, reverse: bool):
  """x -> the gradients of every argument through `impl`'s scan (forward included)."""

  def grads(x):
    _, vjp = jax.vjp(_scan(impl, reverse), *(x[k] for k in _ARGS))
    return vjp(x["dy"])

  return jax.jit(grads)


def _settings() -> dict:
  """name -> the Mosaic kernel's options, every combination of the flags'."""
  names = ("block_t", "shared_steps", "shared_bc", "keep_steps", "auto_barriers")
  flag_values = (_BLOCK_T, _SHARED_STEPS, _SHARED_BC, _KEEP_STEPS, _AUTO_BARRIERS)
  numbers = itertools.product(*(map(int, f.value) for f in flag_values))
  settings = [dict(zip(names, values), channel_sums=sums) for values in numbers for sums in _CHANNEL_SUMS.value]
  return {",".join(f"{k}={v}" for k, v in options.items()): options for options in settings}


def _mosaic(options: dict, reverse: bool):
  return jax.jit(lambda x: mosaic_gpu_backward.gradients(*(x[k] for k in _ARGS), x["dy"], reverse=reverse, **options))


def _errors(grads, expected) -> dict:
  return {
    name: float(jnp.max(jnp.abs(g.astype(jnp.float32) - e.astype(jnp.float32))) / jnp.max(jnp.abs(e)))
    for name, g, e in zip(_ARGS, grads, expected, strict=True)
  }


def main(_):
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]
    make = functools.partial(_with_cotangent, batch, length)
    x = make(0)
    for reverse in (False, True):
      f32 = {k: v.astype(jnp.float32) for k, v in x.items()}
      expected = _vjp("xla", reverse)(f32)
      triton = _vjp("pallas_gpu", reverse)(x)
      for name, options in _settings().items():
        row = {"case": case, "reverse": reverse, "mosaic": name}
        try:
          grads = _mosaic(options, reverse)(x)
          row |= {"error_vs_xla": _errors(grads, expected), "triton_error_vs_xla": _errors(triton, expected)}
        except Exception as e:  # a setting that does not compile is reported, not fatal
          row["error"] = str(e)[:400]
        print(json.dumps(row), flush=True)
        rows.append(row)
    forward = jax.jit(lambda x: _scan("pallas_gpu", False)(*(x[k] for k in _ARGS)))
    timings = {"case": case, "triton_fwd_ms": 1e3 * time_call(forward, make, _REPS.value)}
    timings["triton_fwd_bwd_ms"] = 1e3 * time_call(_vjp("pallas_gpu", False), make, _REPS.value)
    timings["triton_bwd_ms"] = timings["triton_fwd_bwd_ms"] - timings["triton_fwd_ms"]
    for name, options in _settings().items():
      try:
        timings[f"mosaic_bwd_ms {name}"] = 1e3 * time_call(_mosaic(options, False), make, _REPS.value)
      except Exception as e:
        timings[f"mosaic_bwd_error {name}"] = str(e)[:400]
    print(json.dumps(timings), flush=True)
    rows.append(timings)
  write_rows(_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
