r"""The Triton gradient kernel's register cap (`pallas_gpu.GRAD_MAX_REGISTERS`), and whether the fused bidirectional
backward pairs its sub-chunks (`PAIRED_BIDIRECTIONAL_GRADS`), timed per setting in one process.

  PYTHONPATH=. python experiments/benchmarks/scan_register_cap.py --cases=224_b128,1248_b8 --settings=0:0,0:168,1:168 \
      --out=experiments/results/scan_register_cap_h100.json

A setting is paired:cap (cap 0: none). Per case (`scan_common.CASES`, bf16, Vim-Ti's channels and state): one ungated
direction's forward+backward (`jax.vjp` of `selective_scan`, as `scan_mosaic_backward.py`) and Vim's fused
bidirectional forward+backward with the gate, in ms, and the bidirectional gradients' largest difference from the
first setting's (over the largest magnitude). The forward is the same in every setting (it takes no cap).
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import CASES, make_inputs, time_call, write_rows
from kernels import Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import pallas_gpu, triton_registers

_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8"], "Shapes (scan_common.CASES).")
_SETTINGS = flags.DEFINE_list("settings", ["0:0", "0:168"], "paired:cap, cap 0 for none.")
_REPS = flags.DEFINE_integer("reps", 20, "Timed calls per setting.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")

_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
_BIDIRECTIONAL_ARGS = ("u", "delta", "u2", "delta2", "B", "C", "z")


def _one_direction(x: dict):
  def scan(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus=True, impl="pallas_gpu")

  _, vjp = jax.vjp(scan, *(x[k] for k in _ARGS))
  return vjp(x["dy"])


def _bidirectional(x: dict):
  def scan(u, delta, u2, delta2, B, C, z):
    forward = Direction(u, delta, x["A"], B, C, x["D"], x["delta_bias"])
    backward = forward._replace(u=u2, delta=delta2)
    return selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl="pallas_gpu")

  _, vjp = jax.vjp(scan, *(x[k] for k in _BIDIRECTIONAL_ARGS))
  return vjp(x["dy"])


def _inputs(batch: int, length: int, seed: int) -> dict:
  """`make_inputs` plus a cotangent and the second direction's u and delta."""
  x = make_inputs(batch, length, jnp.bfloat16, seed)
  keys = jax.random.split(jax.random.key(seed + 50), 3)
  shape = x["u"].shape
  return x | {
    "dy": jax.random.normal(keys[0], shape, jnp.bfloat16),
    "u2": jax.random.normal(keys[1], shape, jnp.bfloat16),
    "delta2": (0.5 * jax.random.normal(keys[2], shape)).astype(jnp.bfloat16),
  }


def main(_):
  print(jax.devices()[0].device_kind, jax.__version__, "caps registers:", triton_registers.CAPS_REGISTERS)
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]

    def make(seed, batch=batch, length=length):
      return _inputs(batch, length, seed)

    first = None
    for setting in _SETTINGS.value:
      paired, cap = (int(v) for v in setting.split(":"))
      pallas_gpu.PAIRED_BIDIRECTIONAL_GRADS, pallas_gpu.GRAD_MAX_REGISTERS = bool(paired), cap or None
      # Fresh functions, so that each setting is traced (and its kernels named) again.
      one, both = jax.jit(lambda x: _one_direction(x)), jax.jit(lambda x: _bidirectional(x))  # noqa: PLW0108
      row = {"case": case, "paired_bidirectional": bool(paired), "max_registers": cap or None}
      row["one_direction_fwd_bwd_ms"] = 1e3 * time_call(one, make, _REPS.value)
      row["bidirectional_fwd_bwd_ms"] = 1e3 * time_call(both, make, _REPS.value)
      grads = [g.astype(jnp.float32) for g in both(make(7))]
      first = first or grads
      row["bidirectional_grads_vs_first"] = max(
        float(jnp.max(jnp.abs(g - f)) / jnp.max(jnp.abs(f))) for g, f in zip(grads, first, strict=True)
      )
      print(json.dumps(row), flush=True)
      rows.append(row)
  write_rows(_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
