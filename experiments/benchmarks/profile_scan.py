r"""Where one scan direction's forward+backward spends its device time, kernel by kernel, gated and ungated.

  PYTHONPATH=. python experiments/benchmarks/profile_scan.py --cases=224_b128,1248_b8 \
      > experiments/results/profile_scan_one_direction_h100.txt

The step is `scan_bench.py`'s (issue 3's form): the value and the gradients of all eight arrays of
sum(y · w) for one Vim-Ti direction, bf16, `impl=--impl`; ungated is the same call without z. Each is
compiled, warmed up and timed (wall ms per call over --calls calls), then --calls calls are traced and the
trace's GPU kernels summed per kernel name (`trace_kernels.breakdown`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import CASES, CHANNELS, make_inputs, scan_fn
from experiments.benchmarks.trace_kernels import breakdown, op_names, perfetto_trace

_CASES = flags.DEFINE_list("cases", ["224_b128", "1248_b8"], f"Shapes ({', '.join(CASES)}).")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls timed, then calls traced.")
_IMPL = flags.DEFINE_string("impl", "pallas_gpu", "The scan impl (xla runs on CPU too).")


def _profile(batch: int, length: int, gated: bool) -> tuple[float, dict]:
  """(wall ms per call, `breakdown` of the traced calls)."""
  x = make_inputs(batch, length, jnp.bfloat16, 0)
  if not gated:
    x["z"] = None
  weights = jax.random.normal(jax.random.key(9), (batch, length, CHANNELS), jnp.bfloat16)
  scan = scan_fn(_IMPL.value)
  loss = lambda x: jnp.sum(scan(x).astype(jnp.float32) * weights)  # noqa: E731
  step = jax.jit(jax.value_and_grad(loss)).lower(x).compile()  # compiled once: its HLO names the kernels' ops

  def run():
    for _ in range(_CALLS.value):
      out = step(x)
    jax.block_until_ready(out)

  run()  # warm-up
  start = time.perf_counter()
  run()
  wall_ms = 1e3 * (time.perf_counter() - start) / _CALLS.value
  _, trace = perfetto_trace(run, Path(tempfile.mkdtemp(prefix="profile_scan_")))
  return wall_ms, breakdown(trace, op_names(step.as_text()), _CALLS.value, top=16)


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  print(f"{device}; jax {jax.__version__}; one direction, bf16, forward+backward, {_IMPL.value}", flush=True)
  for case in _CASES.value:
    batch, length = CASES[case]
    for gated in (True, False):
      wall_ms, result = _profile(batch, length, gated)
      print(
        f"\n{case} ({batch} x {length}), {'gated' if gated else 'ungated'}: wall {wall_ms:.3f} ms per call, "
        f"kernels {result['kernel_ms']:.3f} ms\n| kernel | µs per call | per call |\n|---|---|---|"
      )
      for kernel in result["kernels"]:
        print(f"| `{kernel['name'][:60]}` | {1e3 * kernel['ms']:.1f} | {kernel['count_per_call']:g} |", flush=True)


if __name__ == "__main__":
  app.run(main)
