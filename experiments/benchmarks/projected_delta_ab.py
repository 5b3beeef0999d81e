r"""Kernel-level A/B at Vim-Ti's 1248² shapes: the Mosaic forward of both directions with delta as an array against a
`ProjectedDelta` (and that without its WGMMA, or without its step sizes' store, to see which costs), and
`step_projections` with and without dt_proj. Rounds alternate; MOSAIC_GPU_DUMP_PTXAS=1 prints ptxas's registers.

  PYTHONPATH=. python experiments/benchmarks/projected_delta_ab.py [batch]
"""

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import Direction, ProjectedDelta, step_projections
from kernels.selective_scan import mosaic_gpu
from kernels.selective_scan.columns import Columns

b, L, d = int(sys.argv[1]) if len(sys.argv) > 1 else 32, 6085, 384
bf = jnp.bfloat16
k = jax.random.split(jax.random.key(0), 12)
u = [jax.random.normal(k[i], (b, L, d), bf) for i in (0, 1)]
z = jax.random.normal(k[2], (b, L, d), bf)
arr = [jax.random.normal(k[3 + i], (b, L, 48), bf) for i in (0, 1)]
w = [(0.25 * jax.random.normal(k[5 + i], (d, 16))).astype(bf) for i in (0, 1)]
A = -jnp.exp(jax.random.normal(k[7], (d, 16)))
D = jax.random.normal(k[8], (d,))
bias = 0.1 * jax.random.normal(k[9], (d,))
packed16 = (0.05 * jax.random.normal(k[10], (2, d, 64))).astype(bf)


def direction(i, lazy):
  pd = ProjectedDelta(Columns(arr[i], 0, 16), w[i])
  return Direction(u[i], pd if lazy else pd.value(), A, Columns(arr[i], 16, 16), Columns(arr[i], 32, 16), D, bias)


chunks = mosaic_gpu.chunks_to_fill(b, d)
bi = jax.jit(functools.partial(mosaic_gpu.bidirectional, chunks=chunks, **mosaic_gpu.OPTIONS))
STEP_SIZES, STORE = mosaic_gpu._step_sizes, mosaic_gpu._store_wgmma_rows


def variant(patch):
  fn = jax.jit(functools.partial(mosaic_gpu.bidirectional, chunks=chunks, **mosaic_gpu.OPTIONS))
  args = (direction(0, True), direction(1, True), z)
  patch()
  try:
    jax.block_until_ready(fn(*args))
  finally:
    mosaic_gpu._step_sizes, mosaic_gpu._store_wgmma_rows = STEP_SIZES, STORE
  return fn, args


def no_wgmma():
  mosaic_gpu._step_sizes = lambda steps, weight, bias, shape, staged: mosaic_gpu._softplus(
    lax.broadcast_in_dim(bias, shape, [1])
  )


def no_store():
  mosaic_gpu._store_wgmma_rows = lambda values, ref: None


calls = {
  "mosaic delta array": (bi, (direction(0, False), direction(1, False), z)),
  "mosaic ProjectedDelta": (bi, (direction(0, True), direction(1, True), z)),
  "ProjectedDelta without the WGMMA": variant(no_wgmma),
  "ProjectedDelta without the store": variant(no_store),
  "step_projections rank 16": (jax.jit(functools.partial(step_projections.project, rank=16)), (u[0], u[1], packed16)),
  "step_projections rank 0": (
    jax.jit(functools.partial(step_projections.project, rank=0)),
    (u[0], u[1], packed16[:, :, :48]),
  ),
}
for fn, args in calls.values():
  jax.block_until_ready(fn(*args))
rounds = {n: [] for n in calls}
for _ in range(4):
  for name, (fn, args) in calls.items():
    start = time.perf_counter()
    for _ in range(20):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds[name].append(round((time.perf_counter() - start) / 20 * 1e3, 4))
print(jax.devices()[0].device_kind, jax.__version__, f"batch {b}")
for n, r in rounds.items():
  print(json.dumps({"call": n, "ms_rounds": r, "median_ms": float(np.median(r))}))
