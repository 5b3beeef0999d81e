r"""Sweeps the block-end kernel's launch parameters (out_proj, residual add and RMSNorm; `kernels.residual_norm`) at
Vim-Ti shapes in bf16, against XLA's matmul and fusions for the same (`residual_norm.reference`).

  PYTHONPATH=. python experiments/benchmarks/residual_norm_tune.py > residual_norm_tune.txt

Each line: microseconds per call (the best of 3 rounds of --reps calls queued back to back, as
`step_projections_tune.py` times) and the bytes that must cross memory (y and the residual read, the new residual
and its norm written) per second.
"""

import itertools

import jax
import jax.numpy as jnp
from absl import app

from experiments.benchmarks.step_projections_tune import _seconds
from kernels import residual_norm

_CASES = ((128, 197), (32, 6085))  # (batch, length): 224², batch 128 and 1248², batch 32
_SETTINGS = {  # module constant: values swept (every combination)
  "PROGRAMS": (132, 264),
  "NUM_STAGES": (1, 2, 3),
  "BLOCK_ROWS": (32, 64),
  "NUM_WARPS": (4, 8),
}
CHANNELS, DIM, EPS = 384, 192, 1e-5


def main(argv):
  del argv
  print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  for batch, length in _CASES:
    keys = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(keys[0], (batch, length, CHANNELS), jnp.bfloat16)
    kernel = (jax.random.normal(keys[1], (CHANNELS, DIM)) * CHANNELS**-0.5).astype(jnp.bfloat16)
    residual = jax.random.normal(keys[2], (batch, length, DIM), jnp.float32)
    args = (y, kernel, residual, jnp.ones((DIM,), jnp.float32))
    megabytes = batch * length * (CHANNELS * 2 + DIM * (4 + 4 + 2)) / 1e6
    case = f"{batch}x{length}"
    xla = jax.jit(lambda *a: residual_norm.reference(*a, None, eps=EPS, out_dtype=jnp.bfloat16))
    seconds = _seconds(xla, *args)
    print(f"{case} XLA: {seconds * 1e6:.0f} us ({megabytes / 1e3 / seconds:.0f} GB/s)", flush=True)
    for values in itertools.product(*_SETTINGS.values()):
      setting = dict(zip(_SETTINGS, values))
      for name, value in setting.items():
        setattr(residual_norm, name, value)
      label = " ".join(f"{k.lower()}={v}" for k, v in setting.items())
      try:
        fn = jax.jit(lambda *a: residual_norm.project_add_norm(*a, eps=EPS))
        seconds = _seconds(fn, *args)
        print(f"{case} kernel {label}: {seconds * 1e6:.0f} us ({megabytes / 1e3 / seconds:.0f} GB/s)", flush=True)
      except Exception as error:  # noqa: BLE001 (settings past the registers or shared memory fail to compile)
        print(f"{case} kernel {label}: failed ({str(error).splitlines()[0][:120]})", flush=True)


if __name__ == "__main__":
  app.run(main)
