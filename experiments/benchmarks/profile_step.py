r"""Where a Vim step spends its device time: profiler-trace kernels summed by category (scan, conv, matmul, ...).

  PYTHONPATH=. python experiments/benchmarks/profile_step.py --model=vim_tiny --image_size=224 --batch=128 \
      --out=experiments/results/profile_vim_tiny_h100.json

Steps: inference (jitted logits), training (forward, backward, AdamW; bf16 compute, f32 params) and, on request,
the trainer's own step (`model_steps.trainer_step`: the full recipe, mixup and EMA included). Each is
compiled, warmed up and timed (wall ms per call over --calls calls), then --calls calls are traced with
`jax.profiler.trace(..., create_perfetto_trace=True)` and the `perfetto_trace.json.gz` it writes is read.
The events summed are the GPU's kernels (the "Stream" tracks of the `/device:GPU` process) or, where there is
no device track (the CPU backend), the host's XLA op events, where time nested in another event on the same
thread counts once. `kernel_ms` is their sum per call, `busy_ms` the time at least one of them ran: on CPU the
ops run on several threads, and a sum above the busy time says that events overlap.

Each event is labelled "kernel name | HLO op | op_name" (the op_name metadata of that HLO op in the compiled
module; it carries the name scope of a Pallas call, `selective_scan_fwd` say, also when the kernel runs in
interpret mode) and goes to the first category of `trace_kernels.CATEGORIES` whose regex matches the label. Each kernel
row lists its op_names by time: the model's name scopes (`in_proj`, `conv_silu`, `scan`, ...) say which code
a fusion came from. On GPU, kernels inside XLA's command buffers carry the buffer as their HLO op and so no
op_name: set XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute them (at some cost in launch time).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
from absl import app, flags

from experiments.benchmarks.model_steps import Step, forward_step, time_per_call, train_step, trainer_step
from experiments.benchmarks.trace_kernels import breakdown, op_names, perfetto_trace
from vim_jax.models import create_model

_MODEL = flags.DEFINE_string("model", "vim_tiny", "Vim variant (vim_jax.models.create_model).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image size.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per step.")
_SCAN = flags.DEFINE_string("scan_impl", None, "kernels.selective_scan impl (None = by backend: Pallas on GPU).")
_INTERPRET = flags.DEFINE_bool("scan_interpret", False, "Pallas interpret mode (to see the kernels' names on CPU).")
_DEPTH = flags.DEFINE_integer("depth", None, "Override the number of layers (small CPU smoke tests).")
_STEPS = flags.DEFINE_list(
  "steps",
  ["inference", "train"],
  "Steps to profile: inference, train, trainer (override flags do not apply to it).",
)
_CALLS = flags.DEFINE_integer("calls", 3, "Calls timed, and calls traced, per step.")
_TOP = flags.DEFINE_integer("top", 10, "Kernels listed individually.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where traces go (default: a new temporary folder).")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _profile(step: Step, trace_dir: Path) -> dict:
  seconds, args = time_per_call(step, _CALLS.value)  # also the warm-up

  def run():
    nonlocal args
    for _ in range(_CALLS.value):
      args, out = step.call(args)
    jax.block_until_ready((args, out))

  trace_file, trace = perfetto_trace(run, trace_dir)
  return {"wall_ms": 1e3 * seconds, "trace": str(trace_file)} | breakdown(
    trace, op_names(step.compiled.as_text()), _CALLS.value, _TOP.value
  )


def _print(name: str, result: dict) -> None:
  print(
    f"\n{name}: wall {result['wall_ms']:.2f} ms per call; {result['source']}: sum {result['kernel_ms']:.2f} ms, "
    f"busy {result['busy_ms']:.2f} ms per call"
  )
  print("| category | ms per call | % |\n|---|---|---|")
  for category, c in result["categories"].items():
    print(f"| {category} | {c['ms']:.3f} | {c['pct']:.1f} |")
  print("\n| kernel | category | ms per call | per call | % | top op_name |\n|---|---|---|---|---|---|")
  for k in result["kernels"]:
    source = next(iter(k["op_names"]), "")[-90:]
    print(
      f"| `{k['name'][:70]}` | {k['category']} | {k['ms']:.3f} | {k['count_per_call']:g} | {k['pct']:.1f} | {source} |"
    )


def main(argv):
  del argv
  device = jax.devices()[0]
  overrides = {"scan_impl": _SCAN.value, "scan_interpret": _INTERPRET.value}
  overrides |= {"depth": _DEPTH.value} if _DEPTH.value else {}
  results = {"device": device.device_kind, "jax": jax.__version__, "model": _MODEL.value, **overrides}
  results |= {"image_size": _IMAGE_SIZE.value, "batch": _BATCH.value, "calls": _CALLS.value}
  print(f"{_MODEL.value} at {_IMAGE_SIZE.value}², batch {_BATCH.value}, bf16, on {device.device_kind}", flush=True)
  trace_root = Path(_TRACE_DIR.value or tempfile.mkdtemp(prefix="profile_step_"))
  builders = {"inference": forward_step, "train": train_step}
  for name in _STEPS.value:
    if name == "trainer":
      step = trainer_step(_MODEL.value, _IMAGE_SIZE.value, _BATCH.value)
    else:
      step = builders[name](
        create_model(_MODEL.value, img_size=_IMAGE_SIZE.value, dtype="bfloat16", **overrides), _BATCH.value
      )
    results[name] = _profile(step, trace_root / name)
    _print(name, results[name])
    print("tracks (process / thread: events):", json.dumps(results[name]["tracks"]), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
