r"""Vim-Ti A/B, rounds alternating: delta projected in the scan (`projects_delta`) against delta written by
`step_projections`. Scanned layers (one compile of the block); programs lowered one after another, compiled in
parallel threads.

  PYTHONPATH=. python experiments/benchmarks/projected_delta_model_ab.py inference:1248:32:base+projected
"""

import concurrent.futures
import re
import sys
import time

import jax

from experiments.benchmarks import model_steps
from experiments.benchmarks.model_steps import Step, alternate_rounds
from vim_jax.models import create_model, vim

PROJECTS = vim.projects_delta
CODES = {"base": False, "projected": True}


def lowered(mode, size, batch, code):
  vim.projects_delta = PROJECTS if CODES[code] else (lambda *a, **k: False)
  try:
    model = create_model("vim_tiny", img_size=size, dtype="bfloat16", scan_layers=True)
    program = (model_steps.forward_program if mode == "inference" else model_steps.train_program)(model, batch)
    return program, jax.jit(program.fn, donate_argnums=program.donate_argnums).lower(*program.args)
  finally:
    vim.projects_delta = PROJECTS


def step_of(mode, program, compiled):
  if mode == "inference":
    return Step(lambda args: (args, compiled(*args)), program.args, compiled)

  def call(args):
    params, opt_state, loss = compiled(*args)
    return (params, opt_state, *args[2:]), loss

  return Step(call, program.args, compiled)


def main(cases):
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for case in cases:
    mode, size, batch, codes = case.split(":")
    codes = codes.split("+")
    start = time.perf_counter()
    lows = {c: lowered(mode, int(size), int(batch), c) for c in codes}
    with concurrent.futures.ThreadPoolExecutor(len(codes)) as pool:
      compiled = dict(zip(codes, pool.map(lambda low: low[1].compile(), [lows[c] for c in codes])))
    print(case, f"lowered and compiled in {time.perf_counter() - start:.0f} s", flush=True)
    for c in codes:
      text = compiled[c].as_text()
      print(
        c,
        "dot_general/gemm custom calls:",
        len(re.findall(r'custom_call_target="__cublas', text)),
        "beta!=0:",
        len(re.findall(r'"beta":\s*1', text)),
        flush=True,
      )
    steps = {c: step_of(mode, lows[c][0], compiled[c]) for c in codes}
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
