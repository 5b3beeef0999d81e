r"""Which part of the Pallas GPU scan's backward a wrong gradient comes from: per-array errors against the reference.

  python experiments/checks/scan_grad_variants.py --cases=1x6085,1x1000 \
      --variants=shipped,sums_in_xla_everywhere,no_chunks

One direction at Vim-Ti's channels and state (`scan_common.make_inputs`, float32 unless --dtype), gated, with
delta_bias and softplus: y and the gradient of every array of `pallas_gpu` run as each variant (a module constant or
helper patched, the jit caches cleared) and of `xla`, each as its worst error relative to the reference's largest
entry. The forty-fifth session found that way that dA came out wrong on an H100 wherever batch x length is no multiple
of the dB/dC sums' programs, and right with XLA's sums (scan_grad_variants_h100.txt); the forty-sixth found why
(`partial_block_probe.py`), and `pallas_gpu.sum_over_blocks` now refuses such shapes. On CPU the kernels run in
interpret mode (slow: small cases only).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.scan_common import make_inputs
from experiments.checks.gpu_check import relative_error
from kernels import selective_scan
from kernels.selective_scan import pallas_gpu

_CASES = flags.DEFINE_list("cases", ["1x6085", "1x1000"], "batch x length.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Dtype of the (batch, length, channels) and B/C inputs.")
_VARIANTS = flags.DEFINE_list("variants", ["shipped", "sums_in_xla_everywhere"], "See VARIANTS.")


def _xla_sums(partials, dtypes, *, interpret):
  del interpret
  return pallas_gpu.sums_in_xla(partials, dtypes)


# name: (pallas_gpu attribute, value it takes), or None for the code as it ships.
VARIANTS = {
  "shipped": None,
  "no_chunks": ("FILLING_PROGRAMS", 1),
  "sums_in_xla_everywhere": ("_summed_over_blocks", _xla_sums),
  "unpaired_states": ("PAIRED_STATES_PROGRAMS", 0),
  "tiles": ("BY_CHANNEL_PROGRAMS", 0),
}


def _outputs_and_grads(impl: str, x: dict, weights: jax.Array):
  interpret = {"interpret": True} if impl == "pallas_gpu" and jax.default_backend() == "cpu" else {}

  def loss(x):
    y = selective_scan(
      x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
      delta_softplus=True, impl=impl, **interpret,
    )  # fmt: skip
    return jnp.sum(y.astype(jnp.float32) * weights), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  return {"y": y, **grads}


def _relative_errors(got: dict, want: dict) -> str:
  return " ".join(f"{k} {relative_error(got[k], want[k]):.1e}" for k in want)


def _patched(variant: str, run):
  """run() with `variant`'s patch in place (traced afresh: jitted kernels read module constants when traced)."""
  if VARIANTS[variant] is None:
    return run()
  name, value = VARIANTS[variant]
  saved = getattr(pallas_gpu, name)
  setattr(pallas_gpu, name, value)
  jax.clear_caches()
  try:
    return run()
  finally:
    setattr(pallas_gpu, name, saved)
    jax.clear_caches()


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  for case in _CASES.value:
    batch, length = map(int, case.split("x"))
    x = make_inputs(batch, length, jnp.float32, 0)
    weights = jax.random.normal(jax.random.key(9), x["u"].shape)
    want = _outputs_and_grads("reference", x, weights)
    x = {k: v.astype(_DTYPE.value) if v.ndim == 3 else v for k, v in x.items()}
    for variant in _VARIANTS.value:
      got = _patched(variant, lambda x=x, w=weights: _outputs_and_grads("pallas_gpu", x, w))
      print(f"b{batch} l{length} {_DTYPE.value} pallas_gpu {variant}: {_relative_errors(got, want)}", flush=True)
    print(f"b{batch} l{length} {_DTYPE.value} xla: {_relative_errors(_outputs_and_grads('xla', x, weights), want)}")


if __name__ == "__main__":
  app.run(main)
