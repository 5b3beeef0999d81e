"""A register cap for Pallas Triton kernels: Triton's `maxnreg`, which jax's `plgpu.CompilerParams` does not expose.

ptxas gives a kernel as many registers as it likes, up to 255 a thread, and more registers mean fewer warps on a
multiprocessor to hide latency. Triton's compiler caps a kernel at its module's `ttg.maxnreg` attribute (PTX
`.maxnreg`); jax's Triton lowering sets none, and XLA's `--xla_gpu_ptx_compiler_extra_flags=--maxrregcount=N` does
not reach Triton's kernels (H100, fifty-second session: no change in time). So a kernel asks for a cap through its
name (`capped`), and jax's lowering, wrapped once here, moves the cap into the attribute. Where that private
function has moved, kernels run uncapped: slower, not wrong (`CAPS_REGISTERS` says which).
"""

import functools
import re

from jaxlib.mlir import ir

_SUFFIX = re.compile(r"_maxnreg(\d+)$")


def capped(name: str, max_registers: int | None) -> str:
  """`name` for a Pallas Triton kernel whose threads take at most `max_registers` registers (None: no cap)."""
  if max_registers is None:
    return name
  if not 24 <= max_registers <= 255:
    raise ValueError(f"max_registers must be in [24, 255] (a thread's registers), got {max_registers}")
  return f"{name}_maxnreg{max_registers}"


def _with_caps(lower):
  """jax's `lower_jaxpr_to_triton_module`, setting `ttg.maxnreg` on the modules of `capped` kernels."""

  @functools.wraps(lower)
  def lower_capped(*args, **kwargs):
    result = lower(*args, **kwargs)
    module = result.module.operation
    match = _SUFFIX.search(ir.StringAttr(module.attributes["sym_name"]).value)
    if match:
      with module.context:
        module.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), int(match[1]))
    return result

  lower_capped.caps_registers = True
  return lower_capped


def _install() -> bool:
  try:
    from jax._src.pallas.triton import lowering
  except ImportError:
    return False
  lower = getattr(lowering, "lower_jaxpr_to_triton_module", None)
  if lower is None:
    return False
  if not getattr(lower, "caps_registers", False):
    lowering.lower_jaxpr_to_triton_module = _with_caps(lower)
  return True


CAPS_REGISTERS = _install()
