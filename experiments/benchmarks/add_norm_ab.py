r"""Vim-Ti A/B, rounds alternating: the blocks' residual add + RMSNorm as `kernels.add_norm`'s one kernel against
XLA's two. Cases are mode:image_size:batch (`inference` or `train`); scanned layers (one compile of the block).

  PYTHONPATH=. python experiments/benchmarks/add_norm_ab.py inference:1248:32,inference:1024:32,train:224:128
"""

import sys

import jax

from experiments.benchmarks.model_steps import Step, alternate_rounds, forward_step, train_step
from vim_jax.models import create_model, vim

SHIPPED = vim.uses_add_norm_kernel


def _step(mode: str, size: int, batch: int, kernel: bool) -> Step:
  """The compiled step, the add + norm in the kernel or in XLA (the rule patched while the model is built)."""
  vim.uses_add_norm_kernel = SHIPPED if kernel else (lambda cfg: False)
  try:
    model = create_model("vim_tiny", img_size=size, dtype="bfloat16", scan_layers=True)
    return (forward_step if mode == "inference" else train_step)(model, batch)
  finally:
    vim.uses_add_norm_kernel = SHIPPED


def main(cases: list[str]) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    steps = {code: _step(mode, int(size), int(batch), code == "kernel") for code in ("xla", "kernel")}
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
