r"""Vim-Ti inference A/B, rounds alternating: `mosaic_gpu.FITS_LENGTH` as it ships against another, where the Mosaic GPU
forward starts to run instead of the Triton kernels. Cases are image_size:stride:batch; scanned layers (one compile of
the block), both programs compiled in parallel threads.

  PYTHONPATH=. python experiments/benchmarks/fits_length_ab.py 224:8:128,512:16:128,736:16:64 4096
"""

import concurrent.futures
import sys
import time

import jax

from experiments.benchmarks import model_steps
from experiments.benchmarks.model_steps import Step, alternate_rounds
from kernels.selective_scan import mosaic_gpu
from vim_jax.models import create_model

SHIPPED = mosaic_gpu.FITS_LENGTH


def lowered(size, stride, batch, fits_length):
  mosaic_gpu.FITS_LENGTH = fits_length
  try:
    model = create_model("vim_tiny", img_size=size, stride=stride, dtype="bfloat16", scan_layers=True)
    program = model_steps.forward_program(model, batch)
    return program, jax.jit(program.fn).lower(*program.args)
  finally:
    mosaic_gpu.FITS_LENGTH = SHIPPED


def main(cases: list[str], other_length: int) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    size, stride, batch = map(int, case.split(":"))
    codes = {f"fits_length={SHIPPED}": SHIPPED, f"fits_length={other_length}": other_length}
    start = time.perf_counter()
    lows = {c: lowered(size, stride, batch, n) for c, n in codes.items()}
    with concurrent.futures.ThreadPoolExecutor(len(codes)) as pool:
      compiled = dict(zip(codes, pool.map(lambda low: low[1].compile(), lows.values())))
    print(case, f"lowered and compiled in {time.perf_counter() - start:.0f} s", flush=True)
    steps = {c: Step(lambda args, f=compiled[c]: (args, f(*args)), lows[c][0].args, compiled[c]) for c in codes}
    alternate_rounds({"image_size": size, "stride": stride, "batch": batch}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","), int(sys.argv[2]))
