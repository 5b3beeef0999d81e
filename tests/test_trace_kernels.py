"""experiments/benchmarks/trace_kernels.py sums a profiler trace's GPU kernels per kernel and per category."""

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import trace_kernels


def _trace(kernels):
  """A perfetto trace: a GPU stream track with `kernels` ((name, hlo_op, start µs, duration µs)), and a host
  track whose events must not count."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14(Compute)"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
  ]
  spans = [
    {"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": op}}
    for name, op, ts, dur in kernels
  ]
  host = [{"ph": "X", "pid": 2, "tid": 1, "name": "jit_step", "ts": 0.0, "dur": 1000.0, "args": {}}]
  return {"traceEvents": meta + spans + host}


def test_kernels_sum_per_call_by_name_and_category():
  scan_op = "jit(f)/transpose(jvp())/selective_scan_bwd/pallas_call"
  hlo = "\n".join([
    f'  %pallas_call.3 = bf16[2] custom-call(), metadata={{op_name="{scan_op}"}}',
    '  %fusion.1 = f32[2] fusion(), metadata={op_name="jit(f)/in_proj/dot_general"}',
    '  ROOT %loop_convert_fusion = f32[2] fusion(), metadata={op_name="jit(f)/convert_element_type"}',
  ])  # fmt: skip
  names = trace_kernels.op_names(hlo)
  assert names["pallas_call.3"] == scan_op
  assert set(names) == {"pallas_call.3", "fusion.1", "loop_convert_fusion"}
  kernels = [  # two calls' worth: each kernel twice, gaps between them
    ("selective_scan_bwd__1", "pallas_call.3", 0.0, 30.0),
    ("nvjet_sm90_gemm", "fusion.1", 40.0, 10.0),
    ("loop_convert_fusion", "loop_convert_fusion", 50.0, 5.0),
    ("selective_scan_bwd__2", "pallas_call.3", 100.0, 50.0),
    ("nvjet_sm90_gemm", "fusion.1", 160.0, 10.0),
    ("loop_convert_fusion", "loop_convert_fusion", 170.0, 15.0),
  ]
  result = trace_kernels.breakdown(_trace(kernels), names, calls=2)
  assert result["source"] == "device kernels"
  assert result["kernel_ms"] == pytest.approx(0.060)
  assert result["busy_ms"] == pytest.approx(0.060)
  assert {k: round(v["ms"], 6) for k, v in result["categories"].items()} == {
    "scan": 0.040,
    "matmul": 0.010,
    "elementwise/fusion": 0.010,
  }
  first = result["kernels"][0]  # instance numbers dropped: both scan launches are one row
  assert (first["name"], first["category"], first["count_per_call"]) == ("selective_scan_bwd", "scan", 1)
  assert first["ms"] == pytest.approx(0.040)


def test_perfetto_trace_returns_the_file_it_read(tmp_path):
  """The trace of a jitted call on CPU, and the newest file under the folder, which the results name."""
  f = jax.jit(lambda x: jnp.sin(x) * 2)
  x = jnp.ones(64)
  jax.block_until_ready(f(x))
  trace_file, trace = trace_kernels.perfetto_trace(lambda: jax.block_until_ready(f(x)), tmp_path)
  assert trace_file.is_file() and trace_file.is_relative_to(tmp_path) and trace_file.name == "perfetto_trace.json.gz"
  assert any(e.get("ph") == "X" for e in trace["traceEvents"])
