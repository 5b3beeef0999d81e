"""Device kernels of a profiler trace, summed per kernel and per category (scan, conv, matmul, ...): what
`profile_step.py` (model steps) and `profile_scan.py` (one scan) print.

The events summed are the GPU's kernels (the "Stream" tracks of the `/device:GPU` process) or, where there is
no device track (the CPU backend), the host's XLA op events, where time nested in another event on the same
thread counts once. Each event is labelled "kernel name | HLO op | op_name" (the op_name metadata of that HLO op
in the compiled module) and goes to the first category of CATEGORIES whose regex matches the label.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import jax

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


def op_names(hlo_text: str) -> dict[str, str]:
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


def perfetto_trace(run: Callable[[], object], trace_dir: Path) -> tuple[Path, dict]:
  """(the file, the trace) of `run()`'s perfetto trace (`run` should block until its results are ready), written
  under `trace_dir`: the newest there, which another trace in a reused folder leaves for Perfetto's viewer too."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run()
  trace_file = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  with gzip.open(trace_file) as f:
    return trace_file, json.load(f)
