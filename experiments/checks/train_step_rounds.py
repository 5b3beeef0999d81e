r"""Vim-Ti's training step (224², batch 128, bf16) in rounds of calls, with what the host spends dispatching each.

  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv -lms 250 &
  PYTHONPATH=. python experiments/checks/train_step_rounds.py --out=rounds.json [--no_gc]

Why: the thirteenth session saw every fourth round of 20 steps run 16% slower. A round starts on an empty
device queue (the previous one ended in `block_until_ready`), so a host pause early in a round leaves the GPU
idle; later in a round the queued steps hide it. Per round this prints the wall time per step, the longest
and total host dispatch time, and the garbage collector's counts.
"""

import gc
import json
import time

import jax
from absl import app, flags

from experiments.benchmarks.model_steps import train_step
from vim_jax.models import create_model

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Rounds of calls.")
_CALLS = flags.DEFINE_integer("calls", 20, "Calls per round.")
_NO_GC = flags.DEFINE_bool("no_gc", False, "Disable Python's garbage collector first.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the rounds.")


def main(argv):
  del argv
  if _NO_GC.value:
    gc.disable()
  step = train_step(create_model("vim_tiny", img_size=224, dtype="bfloat16"), 128)
  args, out = step.call(step.args)
  jax.block_until_ready(out)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "gc": not _NO_GC.value, "rounds": []}
  for _ in range(_ROUNDS.value):
    start, dispatch = time.perf_counter(), []
    for _ in range(_CALLS.value):
      call = time.perf_counter()
      args, out = step.call(args)
      dispatch.append(1e3 * (time.perf_counter() - call))
    jax.block_until_ready((args, out))
    row = {
      "start_unix_s": time.time(),
      "ms": 1e3 * (time.perf_counter() - start) / _CALLS.value,
      "dispatch_max_ms": max(dispatch),
      "dispatch_sum_ms": sum(dispatch),
      "slowest_call": dispatch.index(max(dispatch)),
      "gc_counts": gc.get_count(),
    }
    result["rounds"].append(row)
    print(json.dumps(row), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
