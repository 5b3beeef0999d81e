r"""Selective-scan timings at Vim-Ti shapes (channels 384, state 16): each impl against the byte floor.

  PYTHONPATH=. python experiments/benchmarks/scan_bench.py --impls=xla,pallas_gpu \
      --out=experiments/results/scan_h100.json

One direction of one Vim layer as the mixer calls it (D, z gate, delta_bias, softplus), and both
directions with the combine (fused by `selective_scan_bidirectional`, and as two calls), forward and
forward+backward (gradients of every array), for bf16 and f32 I/O. The copy bandwidth is measured in the
same run; the byte floor is the HBM traffic a perfect kernel needs (see KINDS) over that bandwidth.
Time per call over --reps calls queued back to back after warm-up (see `time_call`).
Also prints each impl's forward and gradient error against the reference (f32 inputs, on the device).
`--set=module.NAME=VALUE` (repeatable) runs it all with a kernel module's constant changed, e.g.
`--set=kernels.selective_scan.pallas_gpu.GRAD_MAX_REGISTERS=None`.
"""

from __future__ import annotations

import contextlib
import itertools
import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.constants import patched
from experiments.benchmarks.scan_common import (
  CASES,
  CHANNELS,
  STATE,
  bidirectional_fn,
  copy_bandwidth,
  make_inputs,
  scan_fn,
  time_call,
)

_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas_gpu"], "Implementations to time.")
_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8", "1248_b1"], "Shapes (see CASES).")
_DTYPES = flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "I/O dtypes.")
_KINDS = flags.DEFINE_list("kinds", ["one", "bidir", "bidir_two_calls"], "What to time (see KINDS).")
_REPS = flags.DEFINE_integer("reps", 50, "Timed repetitions.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")
_SET = flags.DEFINE_multi_string(
  "set", [], "module.NAME=VALUE: a kernel module's constant set for the whole run (`constants.patched`)."
)


def _outputs_and_grads(impl: str, batch: int, length: int):
  """y and the gradients of all eight arrays for f32 inputs, to compare impls on the device."""
  x = make_inputs(batch, length, jnp.float32, 0)
  weights = jax.random.normal(jax.random.key(9), x["u"].shape)
  return jax.jit(jax.value_and_grad(lambda x: jnp.sum(scan_fn(impl)(x) * weights)))(x)


def _relative_error(actual, expected) -> float:
  return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


# What is timed: one direction, or both directions with the combine, fused or as two calls. Byte floors
# per token in bf16/f32 items: one direction reads u, delta, z, B, C and writes y; both directions read
# u, delta, B, C twice, z once, and write y once.
KINDS = {
  "one": (lambda impl: scan_fn(impl), 4 * CHANNELS + 2 * STATE),
  "bidir": (lambda impl: bidirectional_fn(impl, fused=True), 6 * CHANNELS + 4 * STATE),
  "bidir_two_calls": (lambda impl: bidirectional_fn(impl, fused=False), 6 * CHANNELS + 4 * STATE),
}


def _write(device, bandwidth: float, rows: list[dict]) -> None:
  """Writes --out, if given."""
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      header = {"device": device.device_kind, "jax": jax.__version__, "copy_bytes_per_s": bandwidth, "set": _SET.value}
      json.dump(header | {"rows": rows}, f, indent=2)


def main(argv):
  del argv
  with contextlib.ExitStack() as constants:
    for constant in _SET.value:
      constants.enter_context(patched(constant))
    _time_all()


def _time_all() -> None:
  """Times every case, impl, dtype and kind; prints each row and the table, and writes --out."""
  device = jax.devices()[0]
  bandwidth = copy_bandwidth()
  print(f"{device.device_kind}; jax {jax.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; set {_SET.value}")
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]
    reference = _outputs_and_grads("reference", batch, length)
    for impl in _IMPLS.value:
      errors = jax.tree.map(_relative_error, _outputs_and_grads(impl, batch, length), reference)
      fwd_err, grad_err = errors[0], max(jax.tree.leaves(errors[1]))
      for dtype_name, kind in itertools.product(_DTYPES.value, _KINDS.value):
        dtype = jnp.dtype(dtype_name)
        make_fn, floor_items = KINDS[kind]
        if kind == "one":
          make = lambda seed, b=batch, n=length, d=dtype: make_inputs(b, n, d, seed)  # noqa: E731
        else:
          make = lambda seed, b=batch, n=length, d=dtype: [make_inputs(b, n, d, s) for s in (seed, seed + 100)]  # noqa: E731
        scan = make_fn(impl)
        forward = jax.jit(scan)
        weights = jax.random.normal(jax.random.key(9), (batch, length, CHANNELS), dtype)
        # value_and_grad: the gradient of a loss linear in y does not need y, and XLA would drop the forward.
        loss = lambda x, f=scan, w=weights: jnp.sum(f(x).astype(jnp.float32) * w)  # noqa: E731
        backward = jax.jit(jax.value_and_grad(loss))
        fwd_s = time_call(forward, make, _REPS.value)
        bwd_s = time_call(backward, make, _REPS.value)
        fwd_bytes = batch * length * floor_items * dtype.itemsize
        row = {
          "case": case,
          "batch": batch,
          "length": length,
          "impl": impl,
          "kind": kind,
          "dtype": dtype_name,
          "fwd_ms": 1e3 * fwd_s,
          "fwd_bwd_ms": 1e3 * bwd_s,
          "fwd_floor_ms": 1e3 * fwd_bytes / bandwidth,
          "fwd_over_floor": fwd_s / (fwd_bytes / bandwidth),
          "fwd_rel_err_f32": fwd_err,
          "grad_rel_err_f32": grad_err,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(device, bandwidth, rows)  # after every row: a run stopped by a time limit keeps what it measured
  print(f"\n{device.device_kind}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  print(
    "| case | impl | kind | I/O | forward (ms) | fwd+bwd (ms) | fwd byte floor (ms) | fwd / floor "
    "| fwd / grad error (f32) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['case']} | {r['impl']} | {r['kind']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
      f"{r['fwd_floor_ms']:.3f} | {r['fwd_over_floor']:.1f} | "
      f"{r['fwd_rel_err_f32']:.1e} / {r['grad_rel_err_f32']:.1e} |"
    )


if __name__ == "__main__":
  app.run(main)
