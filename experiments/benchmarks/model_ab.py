r"""A/B of a change to the Pallas GPU scan in the whole model: Vim-Ti with the module as it was against the working
tree's, in one process, rounds alternating between the two.

  git show HEAD:kernels/selective_scan/pallas_gpu.py > kernels/selective_scan/pallas_gpu_before.py
  PYTHONPATH=. python experiments/benchmarks/model_ab.py inference:1248:32,inference:1024:32,train:224:128
  rm kernels/selective_scan/pallas_gpu_before.py

Cases are mode:image_size:batch, mode `inference` (logits, `model_steps.forward_step`) or `train` (forward, backward
and AdamW, `model_steps.train_step`). Both steps are compiled first, the `before` one with the selective-scan API
pointed at `pallas_gpu_before`; then 4 rounds of 10 calls each alternate between them (`model_steps.alternate_rounds`).
Prints one JSON line per case and code: every round's ms per call, their median and XLA's temporary memory.
"""

import sys

import jax

from experiments.benchmarks.model_steps import alternate_rounds, forward_step, train_step
from kernels.selective_scan import api, pallas_gpu, pallas_gpu_before
from vim_jax.models import create_model


def _step(mode: str, size: int, batch: int, module):
  """The compiled step of Vim-Ti with `module` as the API's Pallas GPU scan while it traces."""
  api.pallas_gpu = module
  try:
    model = create_model("vim_tiny", img_size=size, dtype="bfloat16")
    return (forward_step if mode == "inference" else train_step)(model, batch)
  finally:
    api.pallas_gpu = pallas_gpu


def main(cases: list[str]) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    steps = {
      code: _step(mode, int(size), int(batch), m) for code, m in (("before", pallas_gpu_before), ("after", pallas_gpu))
    }
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
