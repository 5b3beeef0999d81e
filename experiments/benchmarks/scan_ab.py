r"""A/B of a change to the Pallas GPU scan: the module as it was against the working tree's, in one process, bf16,
Vim-Ti shapes, rounds alternating between the two.

  git show HEAD:kernels/selective_scan/pallas_gpu.py > kernels/selective_scan/pallas_gpu_before.py
  PYTHONPATH=. python experiments/benchmarks/scan_ab.py 224_b128,1248_b1
  rm kernels/selective_scan/pallas_gpu_before.py

Times, per case (scan_common.CASES): one gated scan forward and forward+backward, and the fused bidirectional
forward. Prints one JSON line per case, code and kind, with every round's ms per call.
"""

import json
import sys

import jax
import jax.numpy as jnp

from experiments.benchmarks.scan_common import CASES, make_inputs, time_call
from kernels.selective_scan import pallas_gpu, pallas_gpu_before

_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
_ROUNDS = 3


def _calls(module) -> dict:
  """{kind: jitted function} of `module`: one gated scan forward and forward+backward, the bidirectional forward."""

  def scan(x):
    return module.scan(*(x[k] for k in _ARGS[:6]), z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)[0]

  def bidirectional(pair):
    forward, backward = (tuple(x[k] for k in _ARGS) for x in pair)
    return module.bidirectional(forward, backward, pair[0]["z"], delta_softplus=True)

  def gradient(x):
    return jnp.sum(scan(x).astype(jnp.float32))

  return {"one_fwd": jax.jit(scan), "one_fwd_bwd": jax.jit(jax.grad(gradient)), "bidir_fwd": jax.jit(bidirectional)}


def main(cases: list[str]) -> None:
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  modules = {"before": _calls(pallas_gpu_before), "after": _calls(pallas_gpu)}
  for case in cases:
    batch, length = CASES[case]

    def one(seed, batch=batch, length=length):
      return make_inputs(batch, length, jnp.bfloat16, seed)

    def pair(seed):
      return one(2 * seed), one(2 * seed + 1)

    rounds = {}
    for _ in range(_ROUNDS):
      for code, calls in modules.items():
        for kind, fn in calls.items():
          ms = time_call(fn, pair if kind.startswith("bidir") else one, 100 if batch > 8 else 200) * 1e3
          rounds.setdefault((code, kind), []).append(round(ms, 4))
    for (code, kind), ms in rounds.items():
      print(json.dumps({"case": case, "code": code, "kind": kind, "ms_rounds": ms}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
