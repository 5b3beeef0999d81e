"""Pallas GPU blocks stay inside their arrays, except where a kernel indexes positions one by one.

jax 0.11.2's Triton lowering does not mask a block that reaches past its array's end (jax 0.12 adds the mask): a
whole-block load there reads past the array, and a whole-block store writes over whatever buffer follows. On an H100
that made the scan's gradients wrong (`pallas_gpu.sum_over_blocks`, forty-sixth session). The scan kernels' blocks do
reach past the sequence's end, but they read and write it one position at a time and stop at its length; every other
kernel must tile its arrays exactly. This traces Vim's inference and gradient with every GPU kernel at token counts,
batches and widths that no block size divides, and checks each launch's blocks (the `pallas_call` equations' grid
mapping, which is jax's own structure and may move between versions).
"""

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl

from vim_jax.models import create_model

POSITION_BY_POSITION = "selective_scan"  # kernels whose blocks may reach past the sequence's end (axis 1)


def _pallas_calls(jaxpr):
  """The `pallas_call` equations of `jaxpr` and of every jaxpr inside it (jit, custom_vjp, scan bodies)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _pallas_calls(sub)


def _overhangs(eqn) -> list[tuple[str, int]]:
  """(operand, axis) of each block dimension that does not divide its array's."""
  found = []
  for mapping in eqn.params["grid_mapping"].block_mappings:
    for axis, (size, block) in enumerate(zip(mapping.array_aval.shape, mapping.block_shape, strict=True)):
      if isinstance(block, pl.Blocked) and size % block.block_size:
        found.append((str(mapping.origin), axis))
  return found


# (batch, image size, dtype, width): 17, 37, 325 (chunks) and 3,137 tokens; batches odd and of 64 (the sums over
# channel blocks); float32 and bf16 (step_projections); few and many rows (each inference add + norm kernel); Vim-Ti's
# width and one that no channel block divides.
CASES = [
  (3, 64, jnp.float32, 192),
  (5, 96, jnp.bfloat16, 192),
  (64, 64, jnp.bfloat16, 192),
  (1, 288, jnp.bfloat16, 192),
  (11, 896, jnp.bfloat16, 192),
  (3, 64, jnp.bfloat16, 72),
]
KERNELS = {
  "add_norm",
  "add_norm_bwd",
  "add_norm_project",
  "projected_add_norm",
  "conv_silu_fwd",
  "conv_silu_bwd",
  "step_projections",
  "selective_scan_fwd",
  "selective_scan_chunk_ends",
  "selective_scan_bwd_states",
  "selective_scan_bwd_carry",
  "selective_scan_bwd",
  "selective_scan_bwd_sum_blocks",
}


def _launches(batch: int, image_size: int, dtype, width: int) -> list:
  """Every Pallas launch of Vim's inference and gradient with the GPU kernels (two layers)."""
  model = create_model(
    "vim_tiny",
    img_size=image_size,
    depth=2,
    embed_dim=width,
    dtype=dtype,
    scan_impl="pallas",
    scan_interpret=True,
    rngs=nnx.Rngs(0),
  )
  graphdef, state = nnx.split(model)
  images = jnp.zeros((batch, image_size, image_size, 3))

  def loss(state):
    return jnp.sum(nnx.merge(graphdef, state)(images))

  return [
    *_pallas_calls(jax.make_jaxpr(jax.grad(loss))(state).jaxpr),
    *_pallas_calls(jax.make_jaxpr(loss)(state).jaxpr),
  ]


def test_only_the_scan_reaches_past_an_array():
  seen = set()
  for case in CASES:
    for eqn in _launches(*case):
      name = eqn.params["name"]
      seen.add(name)
      overhangs = _overhangs(eqn)
      if name.startswith(POSITION_BY_POSITION):
        overhangs = [(origin, axis) for origin, axis in overhangs if axis != 1]
      assert not overhangs, (case, name, overhangs)
  assert seen == KERNELS
