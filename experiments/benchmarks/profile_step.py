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
interpret mode) and goes to the first category of CATEGORIES whose regex matches the label. Each kernel
row lists its op_names by time: the model's name scopes (`in_proj`, `conv_silu`, `scan`, ...) say which code
a fusion came from. On GPU, kernels inside XLA's command buffers carry the buffer as their HLO op and so no
op_name: set XLA_FLAGS=--xla_gpu_enable_command_buffer= to attribute them (at some cost in launch time).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import jax
from absl import app, flags

from experiments.benchmarks.model_steps import Step, forward_step, time_per_call, train_step, trainer_step
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

# First match wins, against "kernel name | HLO op | op_name" (case-insensitive).
CATEGORIES = (
  ("scan", r"selective_scan|_forward_kernel|_adjoint_kernel|_grad_kernel|[/(]scan[/)]"),  # the mixer's "scan" scope
  ("conv", r"convolution|cudnn-conv|conv_general|fprop|dgrad|wgrad|[/(]conv_silu[/)]"),  # the mixer's scope
  ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|\bdot(_general)?\b|^step_projections"),  # that kernel by its name
  ("copy/transpose", r"copy|transpose|memcpy|memset"),
  ("elementwise/fusion", r"fusion|reduce|wrapped_"),
)
DEVICE_PROCESS, DEVICE_TRACK = r"/device:GPU", r"Stream"  # the GPU's kernel tracks in the trace


def _category(label: str) -> str:
  label = re.sub(r"\b(?:transpose|jvp)\(", "(", label)  # the backward pass's op_names are all "transpose(jvp(...))"
  return next((name for name, pattern in CATEGORIES if re.search(pattern, label, re.IGNORECASE)), "other")


def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata, from the compiled module's text."""
  pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\""
  return {m[1]: m[2] for m in re.finditer(pattern, hlo_text, re.MULTILINE)}


def _op_events(trace: dict) -> tuple[str, list[dict], dict[str, int]]:
  """(source, the events to sum, event count per "process / thread" track)."""
  meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
  spans = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
  track = {id(e): (processes.get(e["pid"], "?"), threads.get((e["pid"], e.get("tid")), "?")) for e in spans}
  counts = collections.Counter(" / ".join(track[id(e)]) for e in spans)
  device = [e for e in spans if re.search(DEVICE_PROCESS, track[id(e)][0]) and re.search(DEVICE_TRACK, track[id(e)][1])]
  if device:
    return "device kernels", device, dict(counts)
  return "host XLA ops", [e for e in spans if "hlo_op" in e.get("args", {})], dict(counts)


def _busy_us(events: list[dict]) -> float:
  """Time covered by at least one event: overlapping events count once."""
  busy, covered_to = 0.0, float("-inf")
  for e in sorted(events, key=lambda e: e["ts"]):
    busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], covered_to))
    covered_to = max(covered_to, e["ts"] + e["dur"])
  return busy


def _self_times(events: list[dict]) -> list[tuple[dict, float]]:
  """(event, duration in µs less the events nested in it on the same track): CPU thunks nest (a `call` or
  `while` holds the ops it runs); GPU kernels don't, though back-to-back ones overlap by rounding (< 1 µs)."""
  tracks = collections.defaultdict(list)
  for e in events:
    tracks[e["pid"], e.get("tid")].append(e)
  out = []
  for track in tracks.values():
    open_spans = []  # (end, index in out) of the enclosing events
    for e in sorted(track, key=lambda e: (e["ts"], -e["dur"])):
      while open_spans and open_spans[-1][0] < e["ts"] + e["dur"] - 1e-3:  # ends after it: not nested (1 ns slack)
        open_spans.pop()
      if open_spans:
        parent = open_spans[-1][1]
        out[parent] = (out[parent][0], out[parent][1] - e["dur"])
      out.append((e, e["dur"]))
      open_spans.append((e["ts"] + e["dur"], len(out) - 1))
  return out


def breakdown(trace: dict, op_names: dict[str, str], calls: int, top: int = 10) -> dict:
  """Milliseconds per call by category and by kernel and category (kernel names without instance numbers)."""
  source, events, tracks = _op_events(trace)
  by_category, by_kernel = collections.Counter(), collections.defaultdict(lambda: [0.0, 0])
  sources = collections.defaultdict(collections.Counter)  # kernel -> ms per op_name: which model code ran it
  for e, us in _self_times(events):
    args = e.get("args", {})
    hlo_op = args.get("hlo_op", "")
    op_name = op_names.get(hlo_op) or args.get("name", "")
    category = _category(f"{e['name']} | {hlo_op} | {op_name}")
    by_category[category] += us / 1e3 / calls
    key = re.sub(r"(\.|_+)\d+$", "", e["name"]), category  # "fusion.3", "selective_scan_fwd__1"
    by_kernel[key][0] += us / 1e3 / calls
    by_kernel[key][1] += 1
    sources[key][op_name] += us / 1e3 / calls
  total = sum(by_category.values())
  ranked = sorted(by_kernel.items(), key=lambda item: -item[1][0])
  return {
    "source": source,
    "tracks": tracks,
    "kernel_ms": total,
    "busy_ms": _busy_us(events) / 1e3 / calls,
    "categories": {name: {"ms": ms, "pct": 100 * ms / total} for name, ms in by_category.most_common()},
    "kernels": [
      {
        "name": name,
        "category": c,
        "ms": ms,
        "count_per_call": n / calls,
        "pct": 100 * ms / total,
        "op_names": dict(sources[name, c].most_common(3)),
      }
      for (name, c), (ms, n) in ranked[:top]
    ],
  }


def _profile(step: Step, trace_dir: Path) -> dict:
  seconds, args = time_per_call(step, _CALLS.value)  # also the warm-up
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(_CALLS.value):
      args, out = step.call(args)
    jax.block_until_ready((args, out))
  trace_file = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  with gzip.open(trace_file) as f:
    trace = json.load(f)
  return {"wall_ms": 1e3 * seconds, "trace": str(trace_file)} | breakdown(
    trace, _op_names(step.compiled.as_text()), _CALLS.value, _TOP.value
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
