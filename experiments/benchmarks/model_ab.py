r"""A/B of a change to one kernel module in the whole model: Vim-Ti with the module as it was against the working
tree's, in one process, rounds alternating between the two.

  git show HEAD:kernels/selective_scan/pallas_gpu.py > kernels/selective_scan/pallas_gpu_before.py
  PYTHONPATH=. python experiments/benchmarks/model_ab.py inference:1248:32,inference:1024:32,train:224:128
  rm kernels/selective_scan/pallas_gpu_before.py

Any other kernel module likewise, named as the second argument (its copy beside it, `_before` appended):

  git show HEAD:kernels/add_norm.py > kernels/add_norm_before.py
  PYTHONPATH=. python experiments/benchmarks/model_ab.py train:224:128 kernels.add_norm

or, for a change of one module constant, the working tree's module with that constant set otherwise while the
`before` step traces (no copy needed; `module.NAME=VALUE`, VALUE a Python literal):

  PYTHONPATH=. python experiments/benchmarks/model_ab.py train:224:128 \
      kernels.selective_scan.pallas_gpu.NARROW_STATES_STORE=False

Cases are mode:image_size:batch, mode `inference` (logits, `model_steps.forward_step`) or `train` (forward, backward
and AdamW, `model_steps.train_step`). Both steps are compiled first, the `before` one with every reference that the
model's and the kernels' modules hold to the module replaced by its `_before` copy (or with the constant patched);
then 4 rounds of 10 calls each alternate between them (`model_steps.alternate_rounds`). Prints one JSON line per case
and code: every round's ms per call, their median and XLA's temporary memory.
"""

import contextlib
import importlib
import sys

import jax

from experiments.benchmarks.constants import patched
from experiments.benchmarks.model_steps import alternate_rounds, forward_step, train_step
from vim_jax.models import create_model


@contextlib.contextmanager
def _swapped(module_name: str):
  """Inside the block, every attribute of vim_jax's and kernels' modules that is `module_name`'s module (`from
  kernels import add_norm`, say) is its `_before` copy instead."""
  module, before = (importlib.import_module(name) for name in (module_name, module_name + "_before"))
  holders = [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("vim_jax", "kernels") and m]
  swapped = [(m, key) for m in holders for key, value in list(vars(m).items()) if value is module]
  if not swapped:
    raise ValueError(f"no module of vim_jax or kernels refers to {module_name}")
  for m, key in swapped:
    setattr(m, key, before)
  try:
    yield
  finally:
    for m, key in swapped:
      setattr(m, key, module)


def _step(mode: str, size: int, batch: int):
  """Vim-Ti's compiled step, traced with the kernel modules as the caller set them."""
  model = create_model("vim_tiny", img_size=size, dtype="bfloat16")
  return (forward_step if mode == "inference" else train_step)(model, batch)


def main(cases: list[str], change: str = "kernels.selective_scan.pallas_gpu") -> None:
  print(jax.devices()[0].device_kind, jax.__version__, change, flush=True)
  for case in cases:
    mode, size, batch = case.split(":")
    jax.clear_caches()  # jitted kernel entries read their modules when traced
    with patched(change) if "=" in change else _swapped(change):
      before = _step(mode, int(size), int(batch))
    jax.clear_caches()
    steps = {"before": before, "after": _step(mode, int(size), int(batch))}
    alternate_rounds({"mode": mode, "image_size": int(size), "batch": int(batch)}, steps)


if __name__ == "__main__":
  main(sys.argv[1].split(","), *sys.argv[2:3])
