r"""Registers and spills of the Pallas GPU scan kernels, compiled for an H100 on any host (no GPU needed).

  pip install -e '.[bench]'   # the `triton` package, for its compiler and ptxas
  PYTHONPATH=. python experiments/checks/kernel_registers.py --tunings='{"sub_chunk": 8}' '{"sub_chunk": 4}'
  PYTHONPATH=. python experiments/checks/kernel_registers.py --call=bidirectional --length=6085 --batch=32

Lowers the scan's forward and backward (`--call`: one gated scan, or the fused bidirectional one) at Vim-Ti
shapes, bf16 (or `--dtype=float32`), for an abstract H100 (as the CUDA lowering test does), keeps each kernel's
Triton IR as Pallas emits it, compiles it with the `triton` package for sm_90 and reads ptxas's report. Registers bound
occupancy: an SM has 65,536, so a kernel of one-warp programs at R registers per thread keeps at most
65,536 / (32 R) of them resident.
The package's Triton is not the one inside jaxlib, so counts may differ a little from what XLA builds
(on an H100, Nsight Compute read 128 registers for the states pass, where this reads 140, and 255 for
the backward, as here). Its math lowering differs more: this compile contracts multiply-adds and turns
exp2 into one ex2, where jaxlib's did neither before `kernels/selective_scan/ptx.py` (300 instructions per
position of the forward in Nsight Compute against 225 here, fourteenth session). Read instruction counts
from Nsight Compute on the GPU. Timing still needs the GPU: see ../benchmarks/scan_tune.py. "Main-loop SASS
instructions" counts the kernel's last loop, `sub_chunk` (backward) or `forward_sub_chunk` positions per iteration:
the offline measure of a change to the kernels' arithmetic (kernel_log1p_sm90.md); `--opcodes=N` adds the loop's N
most frequent opcodes per position (kernel_row_vector_loads_sm90.md).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import tempfile

import jax
import jax._src.pallas.triton.pallas_call_registration as registration  # where Pallas emits Triton IR
import jax.numpy as jnp
import triton
from absl import app, flags
from triton.backends.compiler import GPUTarget

from kernels.selective_scan import pallas_gpu

_TUNINGS = flags.DEFINE_multi_string("tunings", ['{"sub_chunk": 8}'], "JSON keyword arguments of pallas_gpu.scan.")
_LENGTH = flags.DEFINE_integer("length", 197, "Sequence length (197: 224², stride 16).")
_BATCH = flags.DEFINE_integer("batch", 128, "Sequences.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "dtype of u, delta, z, B and C.")
_OPCODES = flags.DEFINE_integer(
  "opcodes", 0, "Also list the main loop's most frequent SASS opcodes, this many, per position of the loop."
)
_GRAD_MAX_REGISTERS = flags.DEFINE_integer(
  "grad_max_registers",
  None,
  "pallas_gpu.GRAD_MAX_REGISTERS for this run (0: no cap; unset: the module's); it caps the paired gradient kernel"
  " of --call=scan and ungated_scan.",
)
_CALL = flags.DEFINE_enum(
  "call",
  "scan",
  ["scan", "ungated_scan", "bidirectional"],
  "pallas_gpu.scan (gated, or without z), or the fused bidirectional scan Vim runs.",
)

REGISTERS_PER_SM = 65536


def _triton_modules(
  tuning: dict, length: int, batch: int = 128, call: str = "scan", dtype=jnp.bfloat16
) -> dict[str, str]:
  """{kernel name: Triton IR text} of one forward and backward, with `tuning`; a name that recurs (the
  bidirectional call's second direction) gets a "+"."""
  modules, lower = {}, registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    text = result.module.operation.get_asm(enable_debug_info=False)
    name = re.search(r"tt\.func public @(\w+)", text).group(1)
    while name in modules:
      name += "+"
    modules[name] = text
    return result

  seq = jax.ShapeDtypeStruct((batch, length, 384), dtype)
  vec, bc = jax.ShapeDtypeStruct((384,), jnp.float32), jax.ShapeDtypeStruct((batch, length, 16), dtype)
  arrays = dict(
    u=seq, delta=seq, A=jax.ShapeDtypeStruct((384, 16), jnp.float32), B=bc, C=bc, D=vec, z=seq, delta_bias=vec
  )

  def run(a):
    if call in ("scan", "ungated_scan"):
      return pallas_gpu.scan(**a | {"z": a["z"] if call == "scan" else None}, delta_softplus=True, **tuning)
    direction = tuple(a[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
    return pallas_gpu.bidirectional(direction, direction, a["z"], delta_softplus=True, **tuning)

  def fwd_bwd(arrays):
    outputs, vjp = jax.vjp(run, arrays)
    return outputs, vjp(outputs)

  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
      jax.jit(fwd_bwd).trace(arrays).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
  return modules


def _instructions(ptx: str) -> int:
  """PTX instructions in the kernel's text (a static count: loops are counted once)."""
  lines = (line.strip() for line in ptx.splitlines())
  return sum(1 for line in lines if re.match(r"(@!?%\w+\s+)?[a-z]\w*(\.\w+)*\s", line) and not line.startswith("ret;"))


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LOAD_WIDTHS = {"LDG.E.64": 2, "LDG.E.128": 4}


def _main_loop(sass: str) -> list[str]:
  """The instructions of the kernel's last loop (the sub-chunk loop: any carry loop comes before it); none for a
  kernel without a loop (`sum_over_blocks`)."""
  lines = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
  branches = [(at, int(m.group(1), 16)) for at, ins in lines if (m := re.search(r"BRA 0x([0-9a-f]+)", ins))]
  loops = [(at, target) for at, target in branches if target < at]
  if not loops:
    return []
  end, start = loops[-1]
  return [ins for at, ins in lines if start <= at <= end]


def _unpredicated(ins: str) -> str:
  """A SASS instruction without its predicate guard (`@P0 `, `@!UP1 `...)."""
  return re.sub(r"^@!?U?P\w+\s+", "", ins)


def _load_to_use(sass: str) -> int | None:
  """The fewest instructions between a global load in the main loop and the first instruction that reads
  what it loaded (around the loop's back edge too). A use that comes soon waits for the memory latency:
  loads meant to be in flight for a whole sub-chunk should be used hundreds of instructions later."""
  loop = _main_loop(sass)

  def registers(operands: str) -> set[int]:
    return {int(r) for r in re.findall(r"\bR(\d+)\b", operands)}

  def reads_and_writes(ins: str) -> tuple[set[int], set[int]]:
    op, _, operands = _unpredicated(ins).partition(" ")
    first, _, rest = operands.partition(",")
    if op.startswith(("ST", "BRA", "BAR")):
      return registers(operands), set()
    return registers(rest), registers(first)

  distances = []
  for i, ins in enumerate(loop):
    op = _unpredicated(ins).split(" ")[0]
    if not op.startswith("LDG"):
      continue
    base = min(reads_and_writes(ins)[1])
    pending = set(range(base, base + _LOAD_WIDTHS.get(op, 1)))
    for step in range(1, len(loop)):
      reads, writes = reads_and_writes(loop[(i + step) % len(loop)])
      if pending & reads:
        distances.append(step)
        break
      pending -= writes
      if not pending:
        break
  return min(distances, default=None)  # None: no global load in the loop


def _ptxas_report(ir: str, num_warps: int) -> dict[str, int]:
  with tempfile.TemporaryDirectory() as tmp:
    source, ptx = os.path.join(tmp, "kernel.ttir"), os.path.join(tmp, "kernel.ptx")
    with open(source, "w") as f:
      f.write(ir)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    report = subprocess.run(
      [os.path.join(bin_dir, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
      capture_output=True,
      text=True,
    )
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True)
  numbers = {
    "registers": r"Used (\d+) registers",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
  }
  counts = {key: int(re.search(pattern, report.stderr).group(1)) for key, pattern in numbers.items()}
  loop = _main_loop(sass.stdout)
  return counts | {
    "instructions": _instructions(compiled.asm["ptx"]),
    "loop_instructions": len(loop),
    "load_to_use": _load_to_use(sass.stdout),
    "loop_opcodes": collections.Counter(_unpredicated(ins).split(" ")[0].split(".")[0] for ins in loop),
  }


def _loop_positions(kernel: str, tuning: dict, length: int, batch: int) -> int:
  """The positions one iteration of a kernel's main loop walks: the plan's `forward_sub_chunk` for the forward
  passes, its `sub_chunk` for the backward's (the plan of a differentiated call, as `_triton_modules` lowers)."""
  u, A = jax.ShapeDtypeStruct((batch, length, 384), jnp.bfloat16), jax.ShapeDtypeStruct((384, 16), jnp.float32)
  options = dict(gated=True, reverse=False, softplus=True, interpret=False, filling=pallas_gpu.FILLING_PROGRAMS)
  plan = pallas_gpu._plan(u, A, jnp.float32, tuning=tuning, **options)
  forward = kernel.startswith(("selective_scan_fwd", "selective_scan_chunk_ends"))
  return plan.forward_sub_chunk if forward else plan.sub_chunk


def main(argv):
  del argv
  if _GRAD_MAX_REGISTERS.value is not None:
    pallas_gpu.GRAD_MAX_REGISTERS = _GRAD_MAX_REGISTERS.value or None
  print(
    f"jax {jax.__version__}, triton {triton.__version__}, sm_90; {_CALL.value}, batch {_BATCH.value}, "
    f"length {_LENGTH.value}, {_DTYPE.value}"
  )
  print(
    "| tuning | kernel | registers | spill stores (B) | spill loads (B) | resident warps per SM | PTX instructions "
    "| main-loop SASS instructions | nearest use of a load (SASS instructions) |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for tuning_json in _TUNINGS.value:
    tuning = json.loads(tuning_json)
    num_warps = tuning.get("num_warps", pallas_gpu.NUM_WARPS)
    for name, ir in _triton_modules(tuning, _LENGTH.value, _BATCH.value, _CALL.value, jnp.dtype(_DTYPE.value)).items():
      r = _ptxas_report(ir, num_warps)
      # At most 64 warps and 32 programs per SM, and what the registers allow, in whole programs.
      warps = min(64, 32 * num_warps, REGISTERS_PER_SM // (32 * r["registers"]) // num_warps * num_warps)
      print(
        f"| {tuning_json} | {name} | {r['registers']} | {r['spill_store_bytes']} | {r['spill_load_bytes']} | {warps} "
        f"| {r['instructions']} | {r['loop_instructions']} | {r['load_to_use']} |"
      )
      if _OPCODES.value:
        per = _loop_positions(name, tuning, _LENGTH.value, _BATCH.value)
        common = r["loop_opcodes"].most_common(_OPCODES.value)
        print(f"|  | {name}: per position of its loop ({per}) | " + ", ".join(f"{op} {n / per:g}" for op, n in common))


if __name__ == "__main__":
  app.run(main)
