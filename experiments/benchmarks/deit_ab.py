r"""DeiT's inference as it ships against variants of it, one process, rounds alternating.

  PYTHONPATH=. python experiments/benchmarks/deit_ab.py 1024:32,1248:32,224:128 padded
  PYTHONPATH=. python experiments/benchmarks/deit_ab.py 1024:32,1248:32 tanh_gelu deit_tiny:cudnn

Variants (`VARIANTS`), each a stand-in for one function of `vim_jax.models.deit` while its step traces:
- `padded`: cuDNN's attention padded by a masked key at odd lengths in inference too, as it shipped until the
  forty-seventh session (every DeiT length at stride 16 is odd: the patches and the cls token);
- `tanh_gelu`: the MLP's GELU in its tanh approximation, which is not timm's model (PyTorch's nn.GELU is the erf
  form) but is what `jax.nn.gelu` does by default;
- `bf16_gelu`: the erf form computed in the input's bf16, as it shipped until the forty-seventh session
  (`deit.exact_gelu` says why it changed).
Prints the largest logit difference between the two codes, then one JSON line per code
(`model_steps.alternate_rounds`). The forty-seventh session's `deit_padding_ab_h200.txt` came from this script under
its first name, `deit_padding_ab.py`, which ran `padded` alone.
"""

import sys

import jax
import jax.numpy as jnp

from experiments.benchmarks.model_steps import alternate_rounds, create_model_spec, forward_step
from vim_jax.models import deit


def _padded_attention(q, k, v, implementation, pad_to_even):
  if pad_to_even and q.shape[1] % 2:
    return deit._padded_attention(q, k, v, implementation)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


# The GELUs DeiT's MLP could take instead of `deit.exact_gelu` (deit_gelu_offline.py compiles them too).
GELUS = {
  "tanh_gelu": lambda h: jax.nn.gelu(h, approximate=True),
  "bf16_gelu": lambda h: jax.nn.gelu(h, approximate=False),
}


def mlp_with(gelu):
  """A stand-in for `deit.Mlp.__call__` with `gelu` in place of `deit.exact_gelu`."""
  return lambda self, x: self.fc2(gelu(self.fc1(x)))


VARIANTS = {"padded": (deit, "_attention", _padded_attention)} | {
  name: (deit.Mlp, "__call__", mlp_with(gelu)) for name, gelu in GELUS.items()
}


def _step(spec: str, size: int, batch: int, variant: str | None):
  """The compiled forward, traced with `variant`'s stand-in in place (None: as shipped)."""
  jax.clear_caches()
  if variant is None:
    return forward_step(create_model_spec(spec, size), batch)
  holder, name, stand_in = VARIANTS[variant]
  shipped = getattr(holder, name)
  setattr(holder, name, stand_in)
  try:
    return forward_step(create_model_spec(spec, size), batch)
  finally:
    setattr(holder, name, shipped)


def main(cases: list[str], variant: str, spec: str = "deit_tiny:cudnn") -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; valid: {sorted(VARIANTS)}")
  print(jax.devices()[0].device_kind, jax.__version__, spec, variant, flush=True)
  for case in cases:
    size, batch = map(int, case.split(":"))
    steps = {variant: _step(spec, size, batch, variant), "shipped": _step(spec, size, batch, None)}
    logits = [step.call(step.args)[1].astype(jnp.float32) for step in steps.values()]
    difference = float(jnp.max(jnp.abs(logits[0] - logits[1])))
    print(f"{size}² batch {batch}: logits differ by at most {difference:.3g}", flush=True)
    alternate_rounds({"model": spec, "image_size": size, "batch": batch}, steps, rounds_of=5)


if __name__ == "__main__":
  main(sys.argv[1].split(","), sys.argv[2], *sys.argv[3:4])
