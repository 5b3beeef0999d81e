r"""A/B of how the Pallas GPU scan uses the Mosaic GPU forward, in Vim-Ti's inference: Triton's kernels alone
(`triton`), Mosaic GPU as it was (`before`) and as the working tree runs it (`after`), in one process, rounds
alternating (`model_steps.alternate_rounds`).

  PYTHONPATH=. python experiments/benchmarks/mosaic_ab.py 1248:32,1024:32,1248:8 \
      '{"state_pairs": false, "f32_states": true}' --unchunked

Cases are image_size:batch. The second argument updates `mosaic_gpu.OPTIONS` while `before` traces; `--unchunked`
also has `before` call Mosaic GPU only where the batch alone gives `FITS_PROGRAMS` programs, in one chunk (as before
the thirty-fourth session); `before` is left out where that calls it nowhere. `--sliced` has `before` slice B and C
out of x_proj's output before the launch (as before the thirty-sixth session); `--without_triton` leaves `triton`
out.
"""

import json
import sys

import jax

from experiments.benchmarks.model_steps import alternate_rounds, forward_step
from kernels.selective_scan import mosaic_gpu
from kernels.selective_scan.columns import Columns
from vim_jax.models import create_model

_VIM_TINY_CHANNELS = 384  # the scan's channels: 2 x the embedding's 192


def _step(size: int, batch: int, patches: dict):
  """Vim-Ti's compiled forward with `patches` ({mosaic_gpu attribute: value}) set while it traces."""
  shipped = {name: getattr(mosaic_gpu, name) for name in patches}
  for name, value in patches.items():
    setattr(mosaic_gpu, name, value)
  jax.clear_caches()  # `mosaic_gpu.bidirectional` is jitted: traced again with the patches
  try:
    return forward_step(create_model("vim_tiny", img_size=size, dtype="bfloat16"), batch)
  finally:
    for name, value in shipped.items():
      setattr(mosaic_gpu, name, value)


def _sliced(x, state: int):
  """`mosaic_gpu._state_block` as before the kernel read windows in place: every `Columns` sliced."""
  return (x.value() if isinstance(x, Columns) else x), 0


def main(cases: list[str], before_options: dict, switches: set[str]) -> None:
  unchunked = "--unchunked" in switches
  print(jax.devices()[0].device_kind, jax.__version__, "before:", before_options, *sorted(switches))
  fits, chunks_to_fill = mosaic_gpu.fits, mosaic_gpu.chunks_to_fill

  def fits_unchunked(batch, length, channels, *rest):
    return fits(batch, length, channels, *rest) and chunks_to_fill(batch, channels) == 1

  for case in cases:
    size, batch = map(int, case.split(":"))
    before = {"OPTIONS": mosaic_gpu.OPTIONS | before_options}
    if unchunked:
      before |= {"fits": fits_unchunked, "chunks_to_fill": lambda *_: 1}
    if "--sliced" in switches:
      before |= {"_state_block": _sliced}
    patches = {"triton": {"fits": lambda *_: False}, "before": before, "after": {}}
    if "--without_triton" in switches:
      del patches["triton"]
    if unchunked and chunks_to_fill(batch, _VIM_TINY_CHANNELS) > 1:
      del patches["before"]
    alternate_rounds({"image_size": size, "batch": batch}, {code: _step(size, batch, p) for code, p in patches.items()})


_SWITCHES = {"--unchunked", "--sliced", "--without_triton"}

if __name__ == "__main__":
  if len(sys.argv) < 3 or not set(sys.argv[3:]) <= _SWITCHES:
    sys.exit(__doc__)
  main(sys.argv[1].split(","), json.loads(sys.argv[2]), set(sys.argv[3:]))
