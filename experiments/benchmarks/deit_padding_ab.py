r"""DeiT's cuDNN attention at odd lengths in inference: padded by a masked key (what shipped until the forty-seventh
session) against unpadded (`deit._attention` now pads only where the attention is differentiated), one process,
rounds alternating.

  PYTHONPATH=. python experiments/benchmarks/deit_padding_ab.py 1024:32,1248:32,224:128

Every DeiT length at stride 16 is odd (the cls token), so the padding ran in every DeiT inference of the grid.
Prints the largest logit difference between the two, then one JSON line per code (`model_steps.alternate_rounds`).
"""

import sys

import jax
import jax.numpy as jnp

from experiments.benchmarks.model_steps import alternate_rounds, create_model_spec, forward_step
from vim_jax.models import deit


def _padded(q, k, v, implementation, pad_to_even):
  """The attention as it shipped: an odd length padded for cuDNN whether differentiated or not."""
  if pad_to_even and q.shape[1] % 2:
    return deit._padded_attention(q, k, v, implementation)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def main(cases: list[str], spec: str = "deit_tiny:cudnn") -> None:
  print(jax.devices()[0].device_kind, jax.__version__, spec, flush=True)
  shipped = deit._attention
  for case in cases:
    size, batch = map(int, case.split(":"))
    steps = {}
    for code, attention in (("padded", _padded), ("unpadded", shipped)):
      deit._attention = attention
      jax.clear_caches()
      steps[code] = forward_step(create_model_spec(spec, size), batch)
    deit._attention = shipped
    logits = {code: step.call(step.args)[1].astype(jnp.float32) for code, step in steps.items()}
    difference = float(jnp.max(jnp.abs(logits["padded"] - logits["unpadded"])))
    print(f"{size}² batch {batch}: logits differ by at most {difference:.3g}", flush=True)
    alternate_rounds({"model": spec, "image_size": size, "batch": batch}, steps, rounds_of=5)


if __name__ == "__main__":
  main(sys.argv[1].split(","), *sys.argv[2:3])
