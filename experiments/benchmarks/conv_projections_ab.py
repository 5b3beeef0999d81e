r"""A/B of the mixer's conv + SiLU and x_proj/dt_proj as one kernel launch (`layers.conv_step_projections`, which
computes u from x and projects it from registers) against two (`conv_silu`'s kernel writes u, `step_projections`
reads it back), in Vim-Ti, one process, rounds alternating (`model_steps.alternate_rounds`).

  PYTHONPATH=. python experiments/benchmarks/conv_projections_ab.py inference:1248:32,inference:1024:32,train:224:128

Cases are mode:image_size:batch, mode `inference` (logits, `model_steps.forward_step`) or `train` (forward, backward
and AdamW, `model_steps.train_step`). Also prints, per compiled step, whether the conv's own forward kernel is left
in it: the fused op's backward takes the conv kernels' VJP, whose traced forward must be dead code.
"""

import json
import sys

import jax

from experiments.benchmarks.model_steps import alternate_rounds, forward_step, train_step
from kernels import conv_silu
from vim_jax.models import create_model, layers

_FUSED = layers.conv_step_projections


def _two_launches(x, forward, backward, packed, rank, interpret):
  """The mixer's kernels before the fusion: the conv's kernel, then `step_projections` on its output."""
  us = conv_silu.conv_silu_bidirectional(x, forward, backward, impl="pallas_gpu", interpret=interpret)
  return us, layers.step_projections(*us, packed, rank, interpret)


def _step(mode: str, size: int, batch: int, fused: bool):
  layers.conv_step_projections = _FUSED if fused else _two_launches
  try:
    model = create_model("vim_tiny", img_size=size, dtype="bfloat16")
    return (forward_step if mode == "inference" else train_step)(model, batch)
  finally:
    layers.conv_step_projections = _FUSED


def main(cases: list[str]) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    steps = {code: _step(mode, int(size), int(batch), code == "one_launch") for code in ("two_launches", "one_launch")}
    for code, step in steps.items():
      print(json.dumps({"code": code, "mode": mode, "conv_silu_fwd_kernel": "conv_silu_fwd" in step.compiled.as_text()}))
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
