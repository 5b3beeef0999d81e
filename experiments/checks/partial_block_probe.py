r"""Does this jax's Triton lowering mask a block that reaches past its array's end? Run on the GPU.

  python experiments/checks/partial_block_probe.py
  python experiments/checks/partial_block_probe.py --rows=6085,1554,2048 --repeats=24

The forty-fifth session's `pallas_gpu.sum_over_blocks`: each program sums SUM_ROWS rows of every input over its
blocks, the grid rounded up, so where rows is no multiple of SUM_ROWS the last program's block reaches past the arrays'
end. Three inputs, three outputs; each output is compared with numpy's sums, and the rows that differ are printed.
On an H100 with jax 0.11.2 the first output was always right and the second and third came out wrong in their first
rows, now and then: the previous output's last program wrote its masked-off rows over them, racing the program that
writes them (forty-sixth session, partial_block_probe_h100.txt). jax 0.11.2's lowering has no bounds mask on a block's
loads and stores; jax 0.12 adds one. Exits non-zero if any output is wrong.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.selective_scan.pallas_gpu import SUM_ROWS

_ROWS = flags.DEFINE_list("rows", ["6085", "2048"], "Rows (batch x length) of each case.")
_BLOCKS = flags.DEFINE_integer("blocks", 2, "Channel blocks summed over.")
_REPEATS = flags.DEFINE_integer("repeats", 24, "Runs per case, each with fresh inputs and a fresh compile.")


def sums_with_a_partial_last_program(xs: list[jax.Array]) -> list[jax.Array]:
  """(rows, blocks, 16) arrays summed over axis 1, SUM_ROWS rows per program, the last program's block partial."""
  rows, blocks, state = xs[0].shape

  def kernel(*refs):
    for x_ref, out_ref in zip(refs[: len(xs)], refs[len(xs) :]):
      total = x_ref[:, 0, :]
      for k in range(1, blocks):
        total += x_ref[:, k, :]
      out_ref[...] = total

  return pl.pallas_call(
    kernel,
    grid=(pl.cdiv(rows, SUM_ROWS),),
    in_specs=[pl.BlockSpec((SUM_ROWS, blocks, state), lambda i: (i, 0, 0))] * len(xs),
    out_specs=[pl.BlockSpec((SUM_ROWS, state), lambda i: (i, 0))] * len(xs),
    out_shape=[jax.ShapeDtypeStruct((rows, state), x.dtype) for x in xs],
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
  )(*xs)


def main(argv) -> int:
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
  wrong = 0
  for rows in map(int, _ROWS.value):
    for repeat in range(_REPEATS.value):
      keys = jax.random.split(jax.random.key(repeat), 3)
      xs = [jax.random.normal(key, (rows, _BLOCKS.value, 16), jnp.float32) for key in keys]
      jax.clear_caches()
      outs = jax.jit(sums_with_a_partial_last_program)(xs)
      for i, (out, x) in enumerate(zip(outs, xs)):
        bad = np.nonzero(~np.isclose(np.asarray(out), np.asarray(x).sum(1), atol=1e-5).all(axis=1))[0]
        if len(bad):
          wrong += 1
          print(f"rows {rows} run {repeat} output {i}: {len(bad)} rows wrong, rows {bad.min()}..{bad.max()}")
    print(f"rows {rows}: {_REPEATS.value} runs done, last program {rows % SUM_ROWS or SUM_ROWS} rows", flush=True)
  print(f"{wrong} wrong outputs")
  return int(wrong > 0)


if __name__ == "__main__":
  app.run(main)
