r"""Whole-model effect of the scan impl: Vim forward and forward+backward time and memory, per impl.

  python experiments/benchmarks/model_bench.py --impls=xla,pallas_gpu --out=experiments/results/model_h100.json

For each (resolution, batch) case and impl: a bf16 forward (logits) and a forward+backward (gradients of
a loss of the logits for every parameter; no optimizer), jitted, timed over --reps calls queued back to
back after warm-up. Memory is XLA's compiled temp size (scratch beyond inputs and outputs) and the
device's peak in use after the case (the peak only grows, so cases run smallest first).
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from vim_jax.models import create_model

_MODEL = flags.DEFINE_string("model", "vim_tiny", "Model name (vim_jax.models.create_model).")
_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas_gpu"], "kernels.selective_scan impls.")
_CASES = flags.DEFINE_list("cases", ["224:128", "1248:8"], "image_size:batch pairs.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per measurement.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready([fn(*args) for _ in range(_REPS.value)])
  return (time.perf_counter() - start) / _REPS.value


def _case(size: int, batch: int, impl: str) -> dict:
  model = create_model(_MODEL.value, img_size=size, dtype="bfloat16", scan_impl=impl)
  graphdef, params = nnx.split(model)
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)

  def logits(params, images):
    return nnx.merge(graphdef, params)(images)

  def grads(params, images):
    return jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(logits(p, images))[:, 0]))(params)

  row = {"model": _MODEL.value, "image_size": size, "batch": batch, "impl": impl, "tokens": model.cfg.seq_len}
  for name, fn in (("fwd", logits), ("fwd_bwd", grads)):
    compiled = jax.jit(fn).lower(params, images).compile()
    row[f"{name}_ms"] = 1e3 * _time(compiled, params, images)
    row[f"{name}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
  row["fwd_images_per_s"] = batch / row["fwd_ms"] * 1e3
  stats = jax.devices()[0].memory_stats() or {}
  row["peak_in_use_mib_so_far"] = stats.get("peak_bytes_in_use", 0) / 2**20
  return row


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  print(f"{device}; jax {jax.__version__}")
  rows = []
  for case in _CASES.value:
    size, batch = map(int, case.split(":"))
    for impl in _IMPLS.value:
      rows.append(_case(size, batch, impl))
      print(json.dumps(rows[-1]), flush=True)
  print(f"\n{device}, {_MODEL.value}, bf16")
  print("| image, batch | impl | forward (ms) | images/s | fwd+bwd (ms) | XLA temp fwd / fwd+bwd (MiB) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['image_size']}², {r['batch']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_images_per_s']:.0f} | "
      f"{r['fwd_bwd_ms']:.2f} | {r['fwd_temp_mib']:.0f} / {r['fwd_bwd_temp_mib']:.0f} |"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
