r"""Kernel A/B of the Mosaic forward (both directions, `mosaic_gpu.OPTIONS`): each thread's sum of its products
C_t h_t added with LLVM's contract flag (`mosaic_gpu._contracted_add`, as it ships) against plain adds, Vim-Ti's
channels at 1248² and 1024², batch 32. Rounds alternate; also prints how far the two outputs differ.

  PYTHONPATH=. python experiments/benchmarks/contracted_sums_ab.py \
      > experiments/results/scan_mosaic_gpu_contracted_sums_h100.txt
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir.dialects import arith

from experiments.benchmarks.scan_common import make_inputs
from kernels.selective_scan import mosaic_gpu

SHIPPED = mosaic_gpu._contracted_add
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def _compiled(add, pair):
  """The jitted bidirectional forward with `add` summing the products, run once (traced and compiled)."""
  mosaic_gpu._contracted_add = add
  jax.clear_caches()  # `mosaic_gpu.bidirectional` is jitted: traced again with `add`
  try:
    fn = jax.jit(lambda f, b, z: mosaic_gpu.bidirectional(f, b, z, **mosaic_gpu.OPTIONS))
    args = tuple(tuple(d[k] for k in NAMES) for d in pair) + (pair[0]["z"],)
    return fn, args, np.asarray(fn(*args), np.float32)
  finally:
    mosaic_gpu._contracted_add = SHIPPED


def main() -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for batch, length in ((32, 6085), (32, 4097)):
    case = f"{batch}x{length}"
    with jax.default_device(jax.devices("cpu")[0]):  # inputs made on the host: no other GPU kernels
      pair = jax.device_put([make_inputs(batch, length, jnp.bfloat16, seed) for seed in (0, 1)], jax.devices()[0])
    calls = {name: _compiled(add, pair) for name, add in (("plain adds", arith.addf), ("contracted", SHIPPED))}
    (_, _, a), (_, _, b) = calls.values()
    differ = {"max_abs_diff": float(np.max(np.abs(a - b))), "max_abs": float(np.max(np.abs(a)))}
    print(json.dumps({"case": case} | differ | {"frac_differing": float(np.mean(a != b))}), flush=True)
    rounds = {name: [] for name in calls}
    for _ in range(5):
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
  main()
