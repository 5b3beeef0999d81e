r"""One call of the Pallas GPU scan at Vim-Ti shapes, bf16, for a profiler to read: a forward+backward of one
direction (default, 224², batch 128), with --bidirectional_forward the fused bidirectional forward (inference), or
with --mosaic_backward the Mosaic GPU gradient kernel of one direction (`mosaic_gpu_backward`, Hopper).

  ncu --clock-control none -k regex:selective_scan -c 4 --section WarpStateStats --section SpeedOfLight \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py
  ncu --clock-control none -k regex:'selective_scan_(fwd|chunk_ends)' -c 3 --section WarpStateStats \
      --section SourceCounters --import-source no -o fwd1248 \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py --batch=32 --length=6085 --bidirectional_forward
  ncu --clock-control none -k regex:selective_scan_mosaic_backward -c 1 --section WarpStateStats \
      --section SpeedOfLight --section Occupancy --section InstructionStats \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py --mosaic_backward
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import bidirectional_fn, make_inputs, scan_fn
from kernels.selective_scan import mosaic_gpu_backward

_BATCH = flags.DEFINE_integer("batch", 128, "Sequences.")
_LENGTH = flags.DEFINE_integer("length", 197, "Positions (197: 224², 6085: 1248²).")
_BIDIRECTIONAL = flags.DEFINE_bool("bidirectional_forward", False, "The fused bidirectional forward instead.")
_MOSAIC_BACKWARD = flags.DEFINE_bool("mosaic_backward", False, "The Mosaic GPU gradient kernel instead.")


def main(argv):
  del argv
  if _BIDIRECTIONAL.value:
    pair = tuple(make_inputs(_BATCH.value, _LENGTH.value, jnp.bfloat16, seed) for seed in range(2))
    jax.block_until_ready(jax.jit(bidirectional_fn("pallas_gpu", fused=True))(pair))
    return
  x = make_inputs(_BATCH.value, _LENGTH.value, jnp.bfloat16, 0)
  if _MOSAIC_BACKWARD.value:
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")]
    jax.block_until_ready(jax.jit(mosaic_gpu_backward.gradients)(*args, x["u"]))  # u as the cotangent
    return
  scan = scan_fn("pallas_gpu")
  grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(scan(x).astype(jnp.float32))))  # the value keeps y alive
  jax.block_until_ready(grad(x))


if __name__ == "__main__":
  app.run(main)
