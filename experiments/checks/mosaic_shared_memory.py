r"""Shared memory of each Mosaic GPU launch of Vim's forward, and how many of its programs a multiprocessor holds,
read from the lowering for CUDA on any host (no GPU needed).

  PYTHONPATH=. python experiments/checks/mosaic_shared_memory.py --batch=32 --length=6085 \
      --options='{"block_t": 128}'

Why: Vim-Ti's 1248² and 1024² forwards at batch 32 launch 384 programs per direction, which need three resident a
multiprocessor (132 on an H100); an option that grows a program's shared memory past a third of the multiprocessor's
lost that and ran slower (block_t 128 in the thirty-ninth session, `share_step_u` on both directions in the
fifty-third). Each launch's module is Mosaic GPU MLIR inside the custom call; its `gpu.launch` names the dynamic shared
memory in bytes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental.mosaic.gpu import dialect as mgpu_dialect
from jax.interpreters import mlir as jax_mlir
from jaxlib.mlir import ir

from kernels import Direction
from kernels.selective_scan import mosaic_gpu

# Hopper (H100, H200): shared memory a multiprocessor holds, and what the driver reserves for each resident block.
MULTIPROCESSOR_BYTES = 228 * 1024
RESERVED_PER_BLOCK_BYTES = 1024

_BATCH = flags.DEFINE_integer("batch", 32, "Sequences.")
_LENGTH = flags.DEFINE_integer("length", 6085, "Positions (6085: 1248², stride 16).")
_OPTIONS = flags.DEFINE_string("options", "{}", "JSON: what to change in mosaic_gpu.OPTIONS.")


def kernel_modules(lowered) -> list[ir.Module]:
  """The Mosaic GPU modules of a `jax.stages.Lowered`'s kernels, in program order, parsed from their custom calls'
  bytecode."""
  serialized = []

  def visit(op):
    if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      if "module" in config:
        serialized.append(ir.StringAttr(config["module"]).value_bytes)
    for region in op.regions:
      for block in region:
        for inner in block:
          visit(inner)

  visit(lowered.compiler_ir("stablehlo").operation)
  context = jax_mlir.make_ir_context()  # with JAX's dialects: the modules hold gpu address spaces
  # and Mosaic GPU's, whose barrier memrefs do not parse without it (jax's context lacked it under xdist once)
  mgpu_dialect.register_dialect(context)
  allowed, context.allow_unregistered_dialects = context.allow_unregistered_dialects, True  # versioned op names
  try:
    with context:
      return [ir.Module.parse(module) for module in serialized]
  finally:
    context.allow_unregistered_dialects = allowed


def launch_shared_memory(lowered) -> list[int]:
  """The dynamic shared memory (bytes) of every Mosaic GPU launch in a `jax.stages.Lowered`, in program order: the
  constant each module's one `gpu.launch` takes as its last operand."""
  sizes = []
  for module in kernel_modules(lowered):
    with module.context:
      launches = [op for op in _operations(module.operation) if op.name.endswith("gpu.launch")]
      if len(launches) != 1:
        raise ValueError(f"expected one gpu.launch in a Mosaic GPU module, found {len(launches)}")
      sizes.append(ir.IntegerAttr(launches[0].operands[-1].owner.attributes["value"]).value)
  return sizes


def _operations(op):
  """Every operation nested in `op`."""
  for region in op.regions:
    for block in region:
      for inner in block:
        yield inner
        yield from _operations(inner)


def programs_per_multiprocessor(shared_memory_bytes: int) -> int:
  """How many programs of this much shared memory a Hopper multiprocessor holds at once, by shared memory alone."""
  return MULTIPROCESSOR_BYTES // (shared_memory_bytes + RESERVED_PER_BLOCK_BYTES)


def vim_bidirectional_lowered(batch: int, length: int, options: dict):
  """`mosaic_gpu.bidirectional` with `options` at Vim-Ti's channels and state in bf16, lowered for CUDA."""
  seq = jax.ShapeDtypeStruct((batch, length, 384), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((batch, length, 16), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((384,), jnp.float32)
  direction = Direction(seq, seq, jax.ShapeDtypeStruct((384, 16), jnp.float32), rows, rows, vec, vec)
  call = jax.jit(lambda f, b, z: mosaic_gpu.bidirectional(f, b, z, **options))
  return call.trace(direction, direction, seq).lower(lowering_platforms=("cuda",))


def main(_):
  options = mosaic_gpu.OPTIONS | json.loads(_OPTIONS.value)
  sizes = launch_shared_memory(vim_bidirectional_lowered(_BATCH.value, _LENGTH.value, options))
  for launch, size in enumerate(sizes):
    row = {
      "launch": launch,
      "shared_memory_bytes": size,
      "programs_per_multiprocessor": programs_per_multiprocessor(size),
    }
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
