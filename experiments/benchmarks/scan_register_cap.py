r"""The Triton gradient kernel's register cap (`pallas_gpu.GRAD_MAX_REGISTERS`, `triton_registers`), timed per cap in
one process for each form of the backward.

  PYTHONPATH=. python experiments/benchmarks/scan_register_cap.py --cases=224_b128,1248_b8 --caps=0,168 \
      --out=experiments/results/scan_register_cap_h100.json

Per cap (0: none), every gradient kernel traced is capped at it, whatever `pallas_gpu` would choose; per case
(`scan_common.CASES`, bf16, Vim-Ti's channels and state): one direction's forward+backward (`jax.vjp` of
`selective_scan`) ungated and gated (z given: the form issue 3's benchmark times), in ms, where the kernel runs pairs
of sub-chunks, and Vim's fused bidirectional forward+backward with the gate, where it runs one at a time; and the
bidirectional gradients' largest difference from the first cap's (over the largest magnitude). The forward is the same
at every cap (it takes none). `--shipped` adds a row as `pallas_gpu` chooses.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import CASES, make_inputs, time_call, write_rows
from kernels import Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan import triton_registers

_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8"], "Shapes (scan_common.CASES).")
_CAPS = flags.DEFINE_list("caps", ["0", "168"], "Registers a thread of every gradient kernel may take (0: no cap).")
_SHIPPED = flags.DEFINE_bool("shipped", False, "Also time the caps as pallas_gpu chooses them.")
_REPS = flags.DEFINE_integer("reps", 20, "Timed calls per setting.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rows.")

_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
_BIDIRECTIONAL_ARGS = ("u", "delta", "u2", "delta2", "B", "C", "z")
_CAPPED = triton_registers.capped


def _one_direction(x: dict, *, gated: bool):
  def scan(u, delta, A, B, C, D, delta_bias, z=None):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, impl="pallas_gpu")

  _, vjp = jax.vjp(scan, *(x[k] for k in _ARGS + ("z",) * gated))
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


def _caps_every_gradient_kernel(cap: int | None):
  """`triton_registers.capped` with the gradient kernel's cap replaced by `cap`."""

  def capped(name: str, max_registers: int | None) -> str:
    return _CAPPED(name, cap if name == "selective_scan_bwd" else max_registers)

  return capped


def main(_):
  print(jax.devices()[0].device_kind, jax.__version__, "caps registers:", triton_registers.CAPS_REGISTERS)
  settings = [(int(cap) or None, _caps_every_gradient_kernel(int(cap) or None)) for cap in _CAPS.value]
  settings += [("shipped", _CAPPED)] * _SHIPPED.value
  rows = []
  for case in _CASES.value:
    batch, length = CASES[case]

    def make(seed, batch=batch, length=length):
      return _inputs(batch, length, seed)

    first = None
    for cap, capped in settings:
      triton_registers.capped = capped
      try:
        # Fresh functions, so that each setting is traced (and its kernels named) again.
        ungated, gated = (jax.jit(lambda x, g=g: _one_direction(x, gated=g)) for g in (False, True))
        both = jax.jit(lambda x: _bidirectional(x))  # noqa: PLW0108
        row = {"case": case, "max_registers": cap}
        row["one_direction_fwd_bwd_ms"] = 1e3 * time_call(ungated, make, _REPS.value)
        row["one_gated_direction_fwd_bwd_ms"] = 1e3 * time_call(gated, make, _REPS.value)
        row["bidirectional_fwd_bwd_ms"] = 1e3 * time_call(both, make, _REPS.value)
        grads = [g.astype(jnp.float32) for g in both(make(7))]
      finally:
        triton_registers.capped = _CAPPED
      first = first or grads
      row["bidirectional_grads_vs_first"] = max(
        float(jnp.max(jnp.abs(g - f)) / jnp.max(jnp.abs(f))) for g, f in zip(grads, first, strict=True)
      )
      print(json.dumps(row), flush=True)
      rows.append(row)
  write_rows(_OUT.value, rows)


if __name__ == "__main__":
  app.run(main)
