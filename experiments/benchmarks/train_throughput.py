r"""Training throughput of Vim with the full recipe, and data-parallel scaling over 1..N devices.

  PYTHONPATH=. python experiments/benchmarks/train_throughput.py --model=vim_tiny --per_device_batch=128 \
      --devices=1,2,4 --out=experiments/results/train_throughput_h100.json

For each device count n, the trainer's own jitted step (mixup/cutmix, label smoothing, AdamW with the
official parameter groups, EMA, bf16 compute, f32 parameters) runs on a mesh of the first n devices
with n × per_device_batch images, --steps steps queued back to back after warm-up on a fixed random batch (the
input pipeline is measured on its own by input_pipeline.py). Peak device memory and XLA's temp size are
reported. Then the 1-device batch is stepped on the largest device count too: the losses must agree.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from experiments.benchmarks import model_steps

_MODEL = flags.DEFINE_string("model", "vim_tiny", "Model variant.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size.")
_BATCH = flags.DEFINE_integer("per_device_batch", 128, "Images per device.")
_DEVICES = flags.DEFINE_list("devices", ["1"], "Device counts to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per device count (at least 2).")
_SCAN = flags.DEFINE_string("scan_impl", None, "kernels.selective_scan impl (None = by backend).")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _steps(global_batch: int, devices: list, num_steps: int) -> tuple[list[float], float, int]:
  """(losses, seconds per step, compiled temp bytes): 3 warm-up steps, then `num_steps` queued back to back
  as the trainer's loop runs them (it fetches metrics every `log_every_steps`), timed to the last one's end."""
  step = model_steps.trainer_step(_MODEL.value, _IMAGE_SIZE.value, global_batch, devices, _SCAN.value)
  args, metrics = step.args, []
  for _ in range(3):
    args, step_metrics = step.call(args)
    metrics.append(step_metrics)
  jax.block_until_ready(args)
  start = time.perf_counter()
  for _ in range(num_steps):
    args, step_metrics = step.call(args)
    metrics.append(step_metrics)
  jax.block_until_ready(args)
  seconds = (time.perf_counter() - start) / num_steps
  return [float(m["loss"]) for m in metrics], seconds, step.compiled.memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  if _STEPS.value < 2:
    raise app.UsageError(f"--steps must be at least 2 (the losses of 5 steps are compared), got {_STEPS.value}")
  device = jax.devices()[0]
  results = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "runs": []}
  print(f"{_MODEL.value} at {_IMAGE_SIZE.value}², {_BATCH.value} images per device, on {device.device_kind}")
  losses_one_device = None
  for n in map(int, _DEVICES.value):
    losses, step, temp = _steps(n * _BATCH.value, jax.devices()[:n], _STEPS.value)
    if n == 1:
      losses_one_device = losses
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()[:n])  # None on CPU
    run = {
      "devices": n,
      "global_batch": n * _BATCH.value,
      "step_ms": 1e3 * step,
      "images_per_sec": n * _BATCH.value / step,
      "images_per_sec_per_device": _BATCH.value / step,
      "xla_temp_mib": temp / 2**20,
      "peak_mib_so_far": peak / 2**20,
    }
    results["runs"].append(run)
    print(json.dumps(run))
  base = results["runs"][0]["images_per_sec_per_device"]
  for run in results["runs"]:
    run["scaling_efficiency"] = run["images_per_sec_per_device"] / base
  n_max = max(map(int, _DEVICES.value))
  if n_max > 1 and losses_one_device:
    # The same global batch (the 1-device one, same seed) split over n_max devices.
    many = _steps(_BATCH.value, jax.devices()[:n_max], 2)[0]
    one = losses_one_device[: len(many)]  # 3 warm-up steps and 2 more, as many as --steps >= 2 gives
    rel = float(np.max(np.abs(np.array(one) - np.array(many)) / np.abs(np.array(one))))
    results["equal_losses"] = {
      "global_batch": _BATCH.value,
      "devices": [1, n_max],
      "losses_1": one,
      f"losses_{n_max}": many,
      "max_rel_diff": rel,
    }
    print(json.dumps(results["equal_losses"]))
  print("\n| devices | global batch | step (ms) | images/s | per device | efficiency | XLA temp (MiB) |")
  print("|---|---|---|---|---|---|---|")
  for r in results["runs"]:
    print(
      f"| {r['devices']} | {r['global_batch']} | {r['step_ms']:.1f} | {r['images_per_sec']:.0f} | "
      f"{r['images_per_sec_per_device']:.0f} | {r['scaling_efficiency']:.2f} | {r['xla_temp_mib']:.0f} |"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
