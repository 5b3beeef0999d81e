r"""One forward+backward of the Pallas GPU scan at Vim-Ti 224², batch 128, bf16, for a profiler to read.

  ncu --clock-control none -k regex:selective_scan -c 4 --section WarpStateStats --section SpeedOfLight \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py
"""

import jax
import jax.numpy as jnp

from experiments.benchmarks.scan_common import make_inputs, scan_fn

x = make_inputs(128, 197, jnp.bfloat16, 0)
scan = scan_fn("pallas_gpu")
grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(scan(x).astype(jnp.float32))))  # the value keeps y alive
jax.block_until_ready(grad(x))
