"""The register cap for Pallas Triton kernels (`triton_registers`): names, their errors, and the attribute Triton reads
set at lowering, for capped kernels only."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.selective_scan import triton_registers


def test_capped_names_the_cap_and_leaves_uncapped_names_alone():
  assert triton_registers.capped("selective_scan_bwd", 168) == "selective_scan_bwd_maxnreg168"
  assert triton_registers.capped("selective_scan_bwd", None) == "selective_scan_bwd"


@pytest.mark.parametrize("max_registers", [0, 23, 256])
def test_capped_refuses_a_cap_no_thread_can_have(max_registers):
  with pytest.raises(ValueError, match=rf"max_registers must be in \[24, 255\].*got {max_registers}"):
    triton_registers.capped("kernel", max_registers)


def _lowered_for_h100(name: str) -> str:
  """HLO of a one-line Pallas Triton kernel named `name`, lowered for an H100 on any host."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")

  def double(x_ref, o_ref):
    o_ref[...] = 2 * x_ref[...]

  out_shape = jax.ShapeDtypeStruct((32,), jnp.float32)
  kernel = pl.pallas_call(double, out_shape=out_shape, compiler_params=plgpu.CompilerParams(), name=name)
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    return jax.jit(kernel).trace(jax.ShapeDtypeStruct((32,), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_lowering_sets_tritons_attribute_on_capped_kernels_only():
  assert triton_registers.CAPS_REGISTERS  # this jax's Triton lowering is where the wrapper expects it
  assert "ttg.maxnreg" in _lowered_for_h100(triton_registers.capped("probe", 128))
  assert "ttg.maxnreg" not in _lowered_for_h100("probe")
