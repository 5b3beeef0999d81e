r"""Vim-Ti inference A/B, rounds alternating: `mosaic_gpu.FITS_LENGTH` as it ships against another, where the Mosaic GPU
forward starts to run instead of the Triton kernels. Cases are image_size:stride:batch; scanned layers (one compile of
the block).

  PYTHONPATH=. python experiments/benchmarks/fits_length_ab.py 224:8:128,512:16:128,736:16:64 4096
"""

import sys

import jax

from experiments.benchmarks.model_steps import Step, alternate_rounds, forward_step
from kernels.selective_scan import mosaic_gpu
from vim_jax.models import create_model

SHIPPED = mosaic_gpu.FITS_LENGTH


def _step(size: int, stride: int, batch: int, fits_length: int) -> Step:
  """The compiled forward with `fits_length` as FITS_LENGTH while it traces."""
  mosaic_gpu.FITS_LENGTH = fits_length
  try:
    model = create_model("vim_tiny", img_size=size, stride=stride, dtype="bfloat16", scan_layers=True)
    return forward_step(model, batch)
  finally:
    mosaic_gpu.FITS_LENGTH = SHIPPED


def main(cases: list[str], other_length: int) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    size, stride, batch = map(int, case.split(":"))
    steps = {f"fits_length={n}": _step(size, stride, batch, n) for n in (SHIPPED, other_length)}
    alternate_rounds({"image_size": size, "stride": stride, "batch": batch}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","), int(sys.argv[2]))
