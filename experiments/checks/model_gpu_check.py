r"""Vim with its GPU kernels against Vim in plain XLA, on the GPU itself: the loss and every parameter gradient.

  python experiments/checks/model_gpu_check.py                      # Vim-Ti, the cases below, float32 and bf16
  python experiments/checks/model_gpu_check.py --cases=1x1248 --dtypes=bfloat16
  python experiments/checks/model_gpu_check.py --interpret --depth=2 --cases=3x32   # interpret mode (CPU)
  python experiments/checks/model_gpu_check.py --cases=6x1248 --against=vim_jax.models.vim.IN_PROJ_WINDOWS=True

One set of parameters (random init, seed 0) runs twice per case: with `scan_impl=None`, which on a GPU takes the
Pallas kernels (scan, conv + SiLU, step projections, add + norm), and with `scan_impl="xla"`, which takes none. The
loss is sum(logits * w) for a fixed random w; each parameter's gradient, the loss and the loss of an undifferentiated
call (the inference kernels) are compared as the largest difference relative to the XLA model's largest entry
(`gpu_check.relative_error`). With --against=module.NAME=VALUE the kernels' model is compared with itself traced with
that module constant set so (an option of the kernels or the model checked on the card).

Why: the kernels' own checks (`scan_gpu_check.py`, `conv_silu_gpu_check.py`, `step_projections_gpu_check.py`) cover
each kernel on its own shapes, and interpret mode on CPU cannot see faults of compiled code. The forty-fifth session
found the scan's gradients wrong on an H100 where batch x length is no multiple of 64, which no model-level check on
the card would have missed. So the default cases include such batches: 3 and 2 images at 224² (591 and 394 rows), 64
(12,608, a multiple), and one image at 512² (1,025 tokens, the scan in chunks).
"""

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments.benchmarks.constants import patched
from experiments.checks.gpu_check import Tally
from vim_jax.models import create_model

_MODEL = flags.DEFINE_string("model", "vim_tiny", "Model name (create_model).")
_CASES = flags.DEFINE_list("cases", ["3x224", "2x224", "64x224", "1x512"], "batch x image size.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_DEPTH = flags.DEFINE_integer("depth", None, "Layers (default: the model's).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernels in interpret mode (CPU smoke test).")
_AGAINST = flags.DEFINE_string(
  "against", "xla", "What the kernels' model is compared with: 'xla' (no kernels), or module.NAME=VALUE (the kernels')."
)

TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1}  # 24 layers of two paths' roundings; the fault found was 0.5-1.0


def _loss_and_grads(image_size: int, dtype: str, kernels: bool, images: jax.Array, weights: jax.Array):
  overrides = {} if _DEPTH.value is None else {"depth": _DEPTH.value}
  if kernels:
    impl = {"scan_impl": "pallas", "scan_interpret": True} if _INTERPRET.value else {"scan_impl": None}
  else:
    impl = {"scan_impl": "xla"}
  model = create_model(_MODEL.value, img_size=image_size, dtype=dtype, rngs=nnx.Rngs(0), **impl, **overrides)
  graphdef, state = nnx.split(model)

  def loss(state, images, weights):  # images and weights as arguments: closed over, XLA would constant-fold them
    logits = nnx.merge(graphdef, state)(images)
    return jnp.sum(logits.astype(jnp.float32) * weights)

  # float32 matmuls at full precision: on a GPU they default to TF32, whose rounding turned the two paths' 1e-6
  # differences into 2.0e-3 (H100, Vim-Ti at 3 x 224, forty-sixth session; 3.4e-6 at full precision).
  precision = "highest" if dtype == "float32" else None
  with jax.default_matmul_precision(precision):
    value, grads = jax.jit(jax.value_and_grad(loss))(state, images, weights)
    inference = jax.jit(loss)(state, images, weights)  # undifferentiated: the inference kernels
  named_grads = {jax.tree_util.keystr(k): g for k, g in jax.tree.leaves_with_path(grads)}
  return {"loss": value, "inference loss": inference, **named_grads}


def main(argv) -> int:
  del argv
  tally = Tally()
  for case in _CASES.value:
    batch, image_size = map(int, case.split("x"))
    images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
    weights = jax.random.normal(jax.random.key(2), (batch, 1000))
    for dtype in _DTYPES.value:
      got = _loss_and_grads(image_size, dtype, True, images, weights)
      if _AGAINST.value == "xla":
        want = _loss_and_grads(image_size, dtype, False, images, weights)
      else:
        with patched(_AGAINST.value):
          want = _loss_and_grads(image_size, dtype, True, images, weights)
      errors, worst = tally.compare(got, want, TOLERANCE[dtype])
      worst_names = sorted(errors, key=errors.get, reverse=True)[:3]
      where = ", ".join(f"{name} {errors[name]:.1e}" for name in worst_names)
      losses = f"loss {errors['loss']:.1e}, inference {errors['inference loss']:.1e}"
      print(f"{_MODEL.value} {case} {dtype}: {losses}; worst {worst:.2e} ({where})", flush=True)
  return tally.verdict()


if __name__ == "__main__":
  app.run(main)
