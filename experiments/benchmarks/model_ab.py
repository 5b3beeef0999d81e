r"""A/B of a change to the Pallas GPU scan in the whole model: Vim-Ti with the module as it was against the working
tree's, in one process, rounds alternating between the two.

  git show HEAD:kernels/selective_scan/pallas_gpu.py > kernels/selective_scan/pallas_gpu_before.py
  PYTHONPATH=. python experiments/benchmarks/model_ab.py inference:1248:32,inference:1024:32,train:224:128
  rm kernels/selective_scan/pallas_gpu_before.py

or, for a change of one of its module constants, the working tree's module with that constant set otherwise while
the `before` step traces (no copy needed):

  PYTHONPATH=. python experiments/benchmarks/model_ab.py train:224:128 NARROW_STATES_STORE=False

Cases are mode:image_size:batch, mode `inference` (logits, `model_steps.forward_step`) or `train` (forward, backward
and AdamW, `model_steps.train_step`). Both steps are compiled first, the `before` one with the selective-scan API
pointed at `pallas_gpu_before` (or with the constant patched); then 4 rounds of 10 calls each alternate between them
(`model_steps.alternate_rounds`). Prints one JSON line per case and code: every round's ms per call, their median and
XLA's temporary memory.
"""

import ast
import contextlib
import importlib
import sys

import jax

from experiments.benchmarks.model_steps import alternate_rounds, forward_step, train_step
from kernels.selective_scan import api, pallas_gpu
from vim_jax.models import create_model


@contextlib.contextmanager
def _patched(constant: str):
  """pallas_gpu with NAME=VALUE (a Python literal) set inside the block."""
  name, value = constant.split("=", 1)
  if not hasattr(pallas_gpu, name):
    raise ValueError(f"pallas_gpu has no {name!r} to patch")
  kept = getattr(pallas_gpu, name)
  setattr(pallas_gpu, name, ast.literal_eval(value))
  try:
    yield pallas_gpu
  finally:
    setattr(pallas_gpu, name, kept)


@contextlib.contextmanager
def _as_api(module):
  """The selective-scan API's Pallas GPU scan is `module` inside the block."""
  api.pallas_gpu = module
  try:
    yield
  finally:
    api.pallas_gpu = pallas_gpu


def _step(mode: str, size: int, batch: int):
  """Vim-Ti's compiled step, traced with the scan module as the caller set it."""
  model = create_model("vim_tiny", img_size=size, dtype="bfloat16")
  return (forward_step if mode == "inference" else train_step)(model, batch)


def main(cases: list[str], constant: str | None = None) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, constant or "pallas_gpu_before", flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    if constant:
      with _patched(constant):
        before = _step(mode, int(size), int(batch))
    else:
      with _as_api(importlib.import_module("kernels.selective_scan.pallas_gpu_before")):
        before = _step(mode, int(size), int(batch))
    steps = {"before": before, "after": _step(mode, int(size), int(batch))}
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","), *sys.argv[2:3])
