r"""How many passes over DeiT's MLP hidden each GELU form costs, from XLA's GPU compile on a machine without a GPU.

  pip install --no-deps jax-cuda12-plugin==$JAX jax-cuda12-pjrt==$JAX   # as for memory_offline.py
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python experiments/benchmarks/deit_gelu_offline.py 1024:32
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=. python experiments/benchmarks/deit_gelu_offline.py 224:128 train

DeiT-Ti's forward, or with `train` its training step (forward, backward, AdamW), with XLA attention (cuDNN's needs cuDNN
installed), compiled for an H100 (`memory_offline.TARGETS`), with
the MLP's GELU in each form of `FORMS`; prints, per form, the fusions of the compiled entry computation that write an
array of the hidden's width (the fc1 matmul's, then elementwise ones) by kind. Nothing is timed.
"""

import re
import sys
from collections import Counter
from unittest import mock

import jax

from experiments.benchmarks.deit_ab import GELUS, mlp_with
from experiments.benchmarks.memory_offline import _compile
from experiments.benchmarks.model_steps import create_model_spec, forward_program, train_program
from vim_jax.models import deit

FORMS = {"float32 (shipped)": deit.exact_gelu, "jax.nn.gelu on bf16": GELUS["bf16_gelu"], "tanh": GELUS["tanh_gelu"]}


def hidden_writers(size: int, batch: int, gelu, program=forward_program) -> tuple[Counter, float]:
  """Kinds of the fusions that write a (rows, hidden) array in DeiT-Ti's compiled `program` with `gelu`, and its
  temporary MiB."""
  with mock.patch.object(deit.Mlp, "__call__", mlp_with(gelu)):
    model = create_model_spec("deit_tiny:xla", size)
    compiled, _ = _compile(program(model, batch), "h100")
  hlo = compiled.as_text()
  width = int(model.cfg.embed_dim * model.cfg.mlp_ratio)
  fusions = re.findall(r"= (\S+) fusion\(.*?kind=(\w+)", hlo[hlo.index("\nENTRY") :])
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return Counter(kind for shape, kind in fusions if re.search(rf",{width}\]", shape)), temp


def main(case: str, mode: str = "inference") -> None:
  size, batch = map(int, case.split(":"))
  program = {"inference": forward_program, "train": train_program}[mode]
  print(f"DeiT-Ti {mode}, {size}², batch {batch}, compiled for an H100 with jax {jax.__version__}", flush=True)
  for name, gelu in FORMS.items():
    kinds, temp = hidden_writers(size, batch, gelu, program)
    writers = f"{sum(kinds.values())} fusions write the hidden ({dict(sorted(kinds.items()))})"
    print(f"{name}: {writers}, {temp:.1f} MiB of temporaries", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:3])
