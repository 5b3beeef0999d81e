r"""Kernel A/B of the Mosaic forward (both directions, `mosaic_gpu.OPTIONS`, in `chunks_to_fill` chunks): the code as
it ships against the same code with one of its module functions patched back to what it replaced (`PATCHES`), at
Vim-Ti's channels. Rounds alternate; also prints how far the two outputs differ.

  PYTHONPATH=. python experiments/benchmarks/mosaic_patch_ab.py --patch=contracted_sums \
      > experiments/results/scan_mosaic_gpu_contracted_sums_h100.txt
  PYTHONPATH=. python experiments/benchmarks/mosaic_patch_ab.py --patch=block_barriers --cases=32:6085,32:4097,8:6085

(`contracted_sums` was `contracted_sums_ab.py` until the fortieth session; same cases, same output.)
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax._src.lib.mlir.dialects import arith

from experiments.benchmarks.scan_common import make_inputs
from kernels.selective_scan import mosaic_gpu

# name: (the module function, what it replaced, that code's name)
PATCHES = {
  # Each thread's sum of its products C_t h_t with LLVM's contract flag (FMAs), against plain adds.
  "contracted_sums": ("_contracted_add", arith.addf, "plain adds"),
  # Each block's barriers around its shared scratch as plain warpgroup barriers, against `commit_smem` (a fence of
  # the async proxy before each).
  "block_barriers": ("_block_barrier", lambda inline: mosaic_gpu.plgpu.commit_smem(), "commit_smem"),
}
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")

_PATCH = flags.DEFINE_enum("patch", "contracted_sums", list(PATCHES), "Which function to patch back.")
_CASES = flags.DEFINE_list("cases", ["32:6085", "32:4097"], "batch:length (Vim-Ti 1248²: 6085, 1024²: 4097).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds of 20 calls per variant.")


def _compiled(function, pair):
  """The jitted bidirectional forward with mosaic_gpu's function patched to `function` (None: as it ships), run once
  (traced and compiled)."""
  name = PATCHES[_PATCH.value][0]
  shipped = getattr(mosaic_gpu, name)
  setattr(mosaic_gpu, name, function or shipped)
  jax.clear_caches()  # `mosaic_gpu.bidirectional` is jitted: traced again with the patch
  try:
    batch, _, channels = pair[0]["u"].shape
    options = mosaic_gpu.OPTIONS | {"chunks": mosaic_gpu.chunks_to_fill(batch, channels)}
    fn = jax.jit(lambda f, b, z: mosaic_gpu.bidirectional(f, b, z, **options))
    args = tuple(tuple(d[k] for k in NAMES) for d in pair) + (pair[0]["z"],)
    return fn, args, np.asarray(fn(*args), np.float32)
  finally:
    setattr(mosaic_gpu, name, shipped)


def main(argv) -> None:
  del argv
  _, replaced, replaced_name = PATCHES[_PATCH.value]
  print(jax.devices()[0].device_kind, jax.__version__, _PATCH.value, flush=True)
  for batch, length in (map(int, case.split(":")) for case in _CASES.value):
    case = f"{batch}x{length}"
    with jax.default_device(jax.devices("cpu")[0]):  # inputs made on the host: no other GPU kernels
      pair = jax.device_put([make_inputs(batch, length, jnp.bfloat16, seed) for seed in (0, 1)], jax.devices()[0])
    calls = {name: _compiled(function, pair) for name, function in ((replaced_name, replaced), ("shipped", None))}
    (_, _, a), (_, _, b) = calls.values()
    differ = {"max_abs_diff": float(np.max(np.abs(a - b))), "max_abs": float(np.max(np.abs(a)))}
    print(json.dumps({"case": case} | differ | {"frac_differing": float(np.mean(a != b))}), flush=True)
    rounds = {name: [] for name in calls}
    for _ in range(_ROUNDS.value):
      for name, (fn, args, _) in calls.items():
        fn(*args).block_until_ready()
        start = time.perf_counter()
        for _ in range(20):
          y = fn(*args)
        y.block_until_ready()
        rounds[name].append(round((time.perf_counter() - start) / 20 * 1e3, 4))
    for name, times in rounds.items():
      print(json.dumps({"case": case, "code": name, "ms_rounds": times, "median_ms": float(np.median(times))}))


if __name__ == "__main__":
  app.run(main)
