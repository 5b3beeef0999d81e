r"""XLA's memory account of Vim and DeiT steps compiled for an H100 or H200 on a machine without a GPU.

  pip install --no-deps jax-cuda12-plugin==$JAX jax-cuda12-pjrt==$JAX   # $JAX: the installed jax's version
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python experiments/benchmarks/memory_offline.py \
      --models=vim_tiny,vim_small --cases=1248:32 --train_cases=224:128 --live_at_peak \
      --out=experiments/results/memory_offline_h200.json

Each row also has the seconds that tracing, lowering and XLA's compile took on this machine (`trace_s`, `lower_s`,
`compile_s`; the card compiles the Mosaic GPU kernels when they first run, which is not in them).

XLA's GPU compiler runs without a device when the CUDA plugin is given a target description (a
`GpuTargetConfigProto`, `TARGETS`): `jax.jit(...).lower(...).compile()` then plans every buffer as on the card, so
the memory columns of throughput.py (`model_mib`, `temp_mib`, `argument_mib`, `xla_peak_mib`) come out of a CPU
machine. Checked against the card: Vim-Ti at 1248², batch 32, code of ea758cc, 1,231.9 MiB of temporaries here and
1,231.9 on an H200 (throughput_vim_deit_twenty_fifth_session_h200.json). The Pallas Triton kernels lower for the
`AbstractDevice` that `TARGETS` names and are compiled by XLA like on the card. Mosaic GPU kernels are compiled only
when they first run, but XLA plans their buffers from the custom call's shapes, so the path the card runs is
compiled here too: `mosaic_gpu.compute_capability` answers the target's (sm_90), and Vim's inference at 1024² and
1248², batch 32 takes the Mosaic GPU forward (`mosaic_gpu.fits`) as on the card. Vim-Ti at 1248², batch 32:
1,434.2 MiB, 832.1 of them temporaries, here and on an H200 (thirtieth session, `ab_model_mosaic_vim_tiny_h200.txt`).
cuDNN's attention needs cuDNN installed (`deit_*:cudnn` fails without it). Nothing here is timed. The plugin skips
its check of the CUDA libraries' versions only with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1.

`--live_at_peak` prints, per case, the buffers live where the entry computation's live bytes peak (a walk over the
scheduled HLO, one buffer per tuple element, views sharing their operand's): what a memory change has to remove.
"""

from __future__ import annotations

import json
import re
import time
from math import prod
from unittest import mock

import jax
from absl import app, flags
from jax.experimental import topologies

from experiments.benchmarks.model_steps import Program, create_model_spec, forward_program, train_program
from kernels.selective_scan import mosaic_gpu
from vim_jax.models import DEIT_VARIANTS

MIB = 2**20

# The device descriptions (fields of XLA's GpuTargetConfigProto, from its specs/*.txtpb) XLA compiles for.
_DEVICE_INFO = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }} device_description_str: "{name}"
"""
TARGETS = {
  "h200": _DEVICE_INFO.format(name="NVIDIA H200", bandwidth=4_800_000_000_000, memory=151_397_597_184),
  "h100": _DEVICE_INFO.format(name="NVIDIA H100 80GB HBM3", bandwidth=3_352_320_000_000, memory=84_942_979_072),
}

_MODELS = flags.DEFINE_list("models", ["vim_tiny", "vim_small"], "name[:impl] per model, as in throughput.py.")
_CASES = flags.DEFINE_list("cases", ["224:128", "512:128", "736:64", "1024:32", "1248:32"], "Inference image:batch.")
_TRAIN_CASES = flags.DEFINE_list("train_cases", ["224:128"], "Training-step image:batch.")
_TARGET = flags.DEFINE_enum("target", "h200", list(TARGETS), "The GPU compiled for.")
_LIVE = flags.DEFINE_bool("live_at_peak", False, "Print the buffers live at each case's peak.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _capability(target: str) -> str:
  """The target's compute capability as `mosaic_gpu.compute_capability` spells it ("9.0")."""
  major = re.search(r"cuda_compute_capability {\s*major: (\d+)", TARGETS[target]).group(1)
  minor = re.search(r"cuda_compute_capability {\s*major: \d+\s*minor: (\d+)", TARGETS[target])
  return f"{major}.{minor.group(1) if minor else 0}"


def _compile(program: Program, target: str) -> tuple[jax.stages.Compiled, dict]:
  """`program` compiled for one deviceless `target` GPU (arguments abstract: nothing is allocated), with the
  kernels the target would run: there is no device here to ask for its compute capability; and the seconds that
  tracing, lowering and XLA's compile took here (Mosaic GPU kernels are compiled on the card, not here)."""
  device = topologies.get_topology_desc("", "cuda", target_config=TARGETS[target], topology="1x1x1").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), program.args)
  name = re.search(r'device_description_str: "([^"]+)"', TARGETS[target]).group(1)
  abstract = jax.sharding.AbstractDevice(device_kind=name, num_cores=132, platform="gpu")  # what Pallas lowers for
  capability = mock.patch.object(mosaic_gpu, "compute_capability", lambda: _capability(target))
  with capability, jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract)):
    jitted = jax.jit(program.fn, in_shardings=sharding, out_shardings=sharding, donate_argnums=program.donate_argnums)
    start = time.perf_counter()
    traced = jitted.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower(lowering_platforms=("cuda",))
    lowered_at = time.perf_counter()
  compiled = lowered.compile()
  seconds = {
    "trace_s": traced_at - start,
    "lower_s": lowered_at - traced_at,
    "compile_s": time.perf_counter() - lowered_at,
  }
  return compiled, seconds


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_INSTRUCTION = re.compile(r"(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)")
_VIEWS = ("bitcast", "get-tuple-element", "tuple")


def live_at_peak(hlo: str) -> tuple[int, list[tuple[int, str, str]]]:
  """(peak bytes, [(bytes, array type, op name)]) of the buffers live at the entry computation's peak: instructions
  in schedule order, each tuple element its own buffer, freed after its last use; views share their operand's."""
  entry = hlo[hlo.index("\nENTRY") :].splitlines()[1:]
  defs, order = {}, []
  for line in entry:
    match = _INSTRUCTION.match(line.strip())
    if not match:
      continue
    name, shape, op, rest = match.groups()
    operands = re.findall(r"%([\w.\-]+(?:#\d+)?)", re.split(r"\), [a-z_]+=", rest)[0])
    index = re.search(r"index=(\d+)", rest) if op == "get-tuple-element" else None
    op_name = re.search(r'op_name="([^"]*)"', rest)
    arrays = re.findall(r"(\w+\[[\d,]*\])", shape)
    # An output written over an operand ({output index}: (operand, {})) is that operand's buffer.
    over = {int(k or 0): int(i) for k, i in re.findall(r"\{(\d*)\}: \((\d+), \{\}\)", rest)}
    defs[name] = (len(order), arrays, op, operands, index and int(index.group(1)), op_name and op_name.group(1), over)
    order.append(name)

  def buffers(value: str) -> list[tuple[str, int]]:
    base, _, element = value.partition("#")
    _, arrays, op, operands, index, _, over = defs[base]
    if element:
      return [buffers(base)[int(element)]]
    if op == "bitcast":
      return buffers(operands[0])
    if op == "get-tuple-element":
      return [buffers(operands[0])[index]]
    if op == "tuple":
      return [b for o in operands for b in buffers(o)]
    return [buffers(operands[over[k]])[0] if k in over else (base, k) for k in range(len(arrays))]

  last_use = {}
  for name in order:
    for operand in defs[name][3]:
      if operand.partition("#")[0] in defs:
        for buffer in buffers(operand):
          last_use[buffer] = defs[name][0]
  live, peak, at_peak = {}, 0, {}
  for step, name in enumerate(order):
    _, arrays, op, *_, over = defs[name]
    if op not in (*_VIEWS, "parameter", "constant"):
      for k, array in enumerate(arrays):
        if k in over:
          continue
        dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", array).groups()
        live[(name, k)] = _BYTES.get(dtype, 1) * prod(int(d) for d in dims.split(",") if d)
    if sum(live.values()) > peak:
      peak, at_peak = sum(live.values()), dict(live)
    live = {b: n for b, n in live.items() if last_use.get(b, -1) > step}
  rows = [(n, defs[name][1][k], defs[name][5] or name) for (name, k), n in at_peak.items()]
  return peak, sorted(rows, reverse=True)


def _as_on_gpu(spec: str) -> str:
  """`spec` with a Vim's default impl made explicit: what None means on a GPU (here the backend is the CPU)."""
  name, impl, *options = spec.split(":") + [""]
  if impl or name in DEIT_VARIANTS:
    return spec
  return ":".join([name, "pallas_gpu", *options]).rstrip(":")


def _case(spec: str, mode: str, size: int, batch: int) -> dict:
  row = {"model": spec, "mode": mode, "image_size": size, "batch": batch}
  try:
    model = create_model_spec(_as_on_gpu(spec), size)
    program = (forward_program if mode == "inference" else train_program)(model, batch)
    compiled, seconds = _compile(program, _TARGET.value)
  except (RuntimeError, ValueError) as e:  # e.g. cuDNN's attention without cuDNN
    return row | {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
  m = compiled.memory_analysis()
  held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  row |= {
    "tokens": model.cfg.seq_len,
    "model_mib": held / MIB,
    "temp_mib": m.temp_size_in_bytes / MIB,
    "argument_mib": m.argument_size_in_bytes / MIB,
    "xla_peak_mib": m.peak_memory_in_bytes / MIB,
  } | seconds
  if _LIVE.value:
    peak, buffers = live_at_peak(compiled.as_text())
    row["live_at_peak_mib"] = peak / MIB
    row["live_at_peak"] = [[n / MIB, array, op] for n, array, op in buffers if n >= MIB]
  return row


def main(argv):
  del argv
  cases = [("inference", c) for c in _CASES.value] + [("train", c) for c in _TRAIN_CASES.value]
  rows = []
  for spec in _MODELS.value:
    for mode, case in cases:
      size, batch = (int(x) for x in case.split(":"))
      row = _case(spec, mode, size, batch)
      rows.append(row)
      if "error" in row:
        print(f"{spec} {mode} {size}² batch {batch}: {row['error']}", flush=True)
        continue
      print(
        f"{spec} {mode} {size}² batch {batch}: model {row['model_mib']:,.1f} MiB, temp {row['temp_mib']:,.1f}, "
        f"args {row['argument_mib']:,.1f}; traced, lowered, compiled in {row['trace_s']:.1f}, {row['lower_s']:.1f},"
        f" {row['compile_s']:.1f} s",
        flush=True,
      )
      for mib, array, op in row.get("live_at_peak", []):
        print(f"  {mib:9,.1f} MiB  {array:24}  {op}")
  if _OUT.value:
    result = {"target": _TARGET.value, "compiled_for": TARGETS[_TARGET.value], "jax": jax.__version__, "rows": rows}
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
