r"""What each of the twenty-ninth session's inference-memory changes costs in time: Vim-Ti, one process, alternating
rounds (4 of 10 calls) over variants of the head, with XLA's temporary memory per variant.

  git show ea758cc:kernels/selective_scan/pallas_gpu.py > kernels/selective_scan/pallas_gpu_before.py
  PYTHONPATH=. python experiments/benchmarks/inference_memory_ab.py inference:1248:32,inference:224:128
  VARIANTS=head,no_partner_alias,ea758cc_kernels PYTHONPATH=. \
      python experiments/benchmarks/inference_memory_ab.py train:224:128

Variants: `head`; `no_barriers` (`layers.materialized` the identity); `no_delta_alias`, `no_partner_alias` and
`states_written` (`pallas_gpu._forward` called without that change); `ea758cc_kernels` (the scan module of ea758cc,
barriers kept). The results are in ab_inference_memory_vim_tiny_h200.txt.
"""

import json
import os
import sys

import jax
import numpy as np

from experiments.benchmarks.model_steps import forward_step, time_per_call, train_step
from kernels.selective_scan import api, pallas_gpu, pallas_gpu_before
from vim_jax.models import create_model, layers

_forward, _materialized = pallas_gpu._forward, layers.materialized


def _forward_without(option: str, value):
  """`_forward` with `option` forced to `value` (y_over: only where it was given as `value[0]`)."""

  def forward(plan, args, **options):
    if option != "y_over":
      options[option] = value
    elif options.get("y_over") == value:
      options["y_over"] = None
    return _forward(plan, args, **options)

  return forward


ALL = {  # (scan module, _forward, materialized)
  "head": (pallas_gpu, _forward, _materialized),
  "no_barriers": (pallas_gpu, _forward, lambda x: x),
  "no_delta_alias": (pallas_gpu, _forward_without("y_over", "delta"), _materialized),
  "no_partner_alias": (pallas_gpu, _forward_without("y_over", "partner"), _materialized),
  "states_written": (pallas_gpu, _forward_without("states", True), _materialized),
  "ea758cc_kernels": (pallas_gpu_before, _forward, _materialized),
}


def _step(mode: str, size: int, batch: int, module, forward, materialized):
  api.pallas_gpu, pallas_gpu._forward, layers.materialized = module, forward, materialized
  try:
    build = train_step if mode == "train" else forward_step
    return build(create_model("vim_tiny", img_size=size, dtype="bfloat16"), batch)
  finally:
    api.pallas_gpu, pallas_gpu._forward, layers.materialized = pallas_gpu, _forward, _materialized


def main(cases: list[str]) -> None:
  variants = {k: ALL[k] for k in os.environ.get("VARIANTS", ",".join(ALL)).split(",")}
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    steps = {k: _step(mode, int(size), int(batch), *v) for k, v in variants.items()}
    rounds = {k: [] for k in steps}
    for _ in range(4):
      for k, step in steps.items():
        seconds, args = time_per_call(step, 10)
        steps[k] = step._replace(args=args)
        rounds[k].append(1e3 * seconds)
    for k, ms in rounds.items():
      temp = steps[k].compiled.memory_analysis().temp_size_in_bytes / 2**20
      print(json.dumps({"case": case, "variant": k, "ms_median": float(np.median(ms)), "ms": ms, "temp_mib": temp}))


if __name__ == "__main__":
  main(sys.argv[1].split(","))
