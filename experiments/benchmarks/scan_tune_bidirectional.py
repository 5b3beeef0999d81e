r"""Times the fused bidirectional Pallas GPU scan (what the model runs) under launch tunings, bf16, Vim-Ti shapes.

  PYTHONPATH=. python experiments/benchmarks/scan_tune_bidirectional.py 224_b128,1248_b32 \
      '[{}, {"block_d": 16}, {"num_warps": 2}, {"sub_chunk": 1}]'

Arguments: cases (scan_common.CASES) and a JSON list of `pallas_gpu.bidirectional` tunings. Prints one JSON line
per case and tuning: forward, forward+backward, and their difference (the backward). With a third argument
`--forward_only`, only the forward, in three rounds (`fwd_ms` lists them): for tunings that only the forward
passes read, such as a layout of long inference sequences. `scan_tune.py` sweeps the one-direction scan.
"""

import json
import sys

import jax
import jax.numpy as jnp

from experiments.benchmarks.scan_common import CASES, make_inputs, time_call
from kernels.selective_scan import pallas_gpu

_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def main(cases: list[str], tunings: list[dict], forward_only: bool = False) -> None:
  print(jax.devices()[0].device_kind, jax.__version__)
  for case in cases:
    batch, length = CASES[case]

    def inputs(seed, batch=batch, length=length):
      return tuple(make_inputs(batch, length, jnp.bfloat16, 2 * seed + k) for k in range(2))

    for tuning in tunings:

      def run(pair, tuning=tuning):
        forward, backward = (tuple(x[k] for k in _ARGS) for x in pair)
        return pallas_gpu.bidirectional(forward, backward, pair[0]["z"], delta_softplus=True, **tuning)

      forward, reps = jax.jit(run), 40 if batch > 8 else 100
      if forward_only:
        rounds = [round(time_call(forward, inputs, reps) * 1e3, 4) for _ in range(3)]
        print(json.dumps({"case": case, **tuning, "fwd_ms": rounds}), flush=True)
        continue
      forward_ms = time_call(forward, inputs, reps) * 1e3
      grad = jax.jit(jax.grad(lambda pair, run=run: jnp.sum(run(pair).astype(jnp.float32))))
      both_ms = time_call(grad, inputs, 20 if batch > 8 else 50) * 1e3
      row = {"case": case, **tuning, "fwd_ms": round(forward_ms, 4), "fwd_bwd_ms": round(both_ms, 4)}
      print(json.dumps({**row, "bwd_ms": round(both_ms - forward_ms, 4)}), flush=True)


if __name__ == "__main__":
  if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["--forward_only"]):
    sys.exit(__doc__)
  main(sys.argv[1].split(","), json.loads(sys.argv[2]), forward_only=sys.argv[3:] == ["--forward_only"])
