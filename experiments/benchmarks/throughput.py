r"""Vim vs DeiT inference throughput and memory over resolution (the paper's Figure 1), and a training step.

  PYTHONPATH=. python experiments/benchmarks/throughput.py \
      --models=vim_tiny,vim_small,deit_tiny:cudnn,deit_tiny:xla,deit_small:cudnn,deit_small:xla \
      --cases=224:128,512:128,736:64,1024:32,1248:32 --train_cases=224:128 \
      --out=experiments/results/throughput_h100.json

Compiling is much of the time (H100, jax 0.11.2: a Vim-Ti forward 11 s, its training step 32 s; DeiT-Ti
4-5 s per case); under a time limit run it in parts on the same card, then merge the JSON files in
plot_throughput.py (fits are per model, so they survive the split).

A model is `name[:impl][:scanned]`: the impl is the scan impl of a Vim (none = by backend: the Pallas kernel
on GPU) and the `jax.nn.dot_product_attention` implementation of a DeiT; `scanned` runs the blocks as one
`lax.scan` (`scan_layers=True`) instead of the default Python loop. `--models=vim_tiny:xla,vim_tiny:pallas_gpu
--cases=224:128,1248:8 --train_cases=224:128,1248:8` shows what the scan kernels do for the whole model.
Everything runs in bf16 compute with f32 parameters, on the first device, whose name goes into the output.

Inference: jitted logits of a random batch; `ms` is the median of --rounds rounds, each of --reps calls queued
back to back after one warm-up (every round in `ms_rounds`).
Training: forward, backward and AdamW on random labels, parameters and optimizer state donated.
Memory per case is XLA's account of the compiled program: `model_mib` = arguments (weights, optimizer state,
images) + outputs − donated + temporaries, i.e. everything the step holds, the number the paper's memory plot
is about; beside it the temp and argument sizes and XLA's `peak_memory_in_bytes` (on CPU it leaves temps
out). jax (0.11, 0.12) cannot reset the device's `peak_bytes_in_use`, so `device_peak_mib` is given only for cases
that raised it (then it is that case's true peak, allocator overhead included) and is null otherwise;
`device_peak_mib_so_far` is always given.
A case that fails (out of memory, an unsupported attention shape) becomes a row with an `error`.

"fits" in the JSON: per model, forward time and model memory against x = batch · tokens (the grid's
batch varies), least squares a + b·x and a + b·x + c·batch·tokens² (the attention term), with R².
"""

from __future__ import annotations

import gc
import json
import time

import jax
import numpy as np
from absl import app, flags

from experiments.benchmarks.model_steps import create_model_spec, forward_step, time_per_call, train_step

_MODELS = flags.DEFINE_list(
  "models",
  ["vim_tiny", "vim_small", "deit_tiny:cudnn", "deit_tiny:xla", "deit_small:cudnn", "deit_small:xla"],
  "name[:impl] per model: the scan impl of a Vim, the attention implementation of a DeiT.",
)
_CASES = flags.DEFINE_list("cases", ["224:128", "512:128", "736:64", "1024:32", "1248:32"], "Inference image:batch.")
_TRAIN_CASES = flags.DEFINE_list("train_cases", ["224:128"], "Training-step image:batch.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per round.")
_ROUNDS = flags.DEFINE_integer(
  "rounds",
  3,
  "Rounds of --reps calls, back to back; `ms` is their median (an H200's training step took 41 ms in "
  "a process's first rounds and 48 in its fourth: ab_command_buffers_vim_tiny_h200.json).",
)
_OUT = flags.DEFINE_string("out", None, "JSON file for the results (rewritten after every case).")

MIB = 2**20


def _device_peak() -> float | None:
  stats = jax.devices()[0].memory_stats()  # None on CPU
  return stats["peak_bytes_in_use"] / MIB if stats else None


def _case(spec: str, mode: str, size: int, batch: int) -> dict:
  row = {"model": spec, "mode": mode, "image_size": size, "batch": batch}
  peak_before = _device_peak()
  try:
    model = create_model_spec(spec, size)
    row["tokens"] = model.cfg.seq_len
    start = time.perf_counter()
    step = (forward_step if mode == "inference" else train_step)(model, batch)
    row["compile_s"] = time.perf_counter() - start
    rounds = []
    for _ in range(_ROUNDS.value):
      seconds, args = time_per_call(step, _REPS.value)
      step = step._replace(args=args)
      rounds.append(seconds)
    seconds = float(np.median(rounds))
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError (e.g. RESOURCE_EXHAUSTED), NotImplementedError
    return row | {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
  m = step.compiled.memory_analysis()
  held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  peak = _device_peak()
  return row | {
    "ms": 1e3 * seconds,
    "ms_rounds": [1e3 * r for r in rounds],
    "images_per_s": batch / seconds,
    "model_mib": held / MIB,
    "temp_mib": m.temp_size_in_bytes / MIB,
    "argument_mib": m.argument_size_in_bytes / MIB,
    "xla_peak_mib": m.peak_memory_in_bytes / MIB,
    "device_peak_mib": peak if peak is not None and peak > peak_before else None,
    "device_peak_mib_so_far": peak,
  }


def _fit(columns: list[np.ndarray], y: np.ndarray) -> dict | None:
  """Least squares y ≈ Σ coef·column, with R²; None unless there are more points than coefficients."""
  if len(y) <= len(columns):
    return None
  design = np.stack(columns, axis=1)
  coef = np.linalg.lstsq(design, y, rcond=None)[0]
  residual = y - design @ coef
  r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
  return {"coef": [float(c) for c in coef], "r2": r2}


def _fits(rows: list[dict]) -> dict:
  fits = {}
  for spec in _MODELS.value:
    ok = [r for r in rows if r["model"] == spec and r["mode"] == "inference" and "error" not in r]
    batch, tokens = np.array([r["batch"] for r in ok], float), np.array([r["tokens"] for r in ok], float)
    linear = [np.ones_like(batch), batch * tokens]
    quadratic = linear + [batch * tokens**2]
    fits[spec] = {}
    for key in ("ms", "model_mib"):
      y = np.array([r[key] for r in ok])
      fits[spec][key] = {"linear": _fit(linear, y), "quadratic": _fit(quadratic, y)}
  return fits


def _num(value, fmt: str = ",.0f") -> str:
  return "—" if value is None else format(value, fmt)


def _print_tables(results: dict) -> None:
  print(
    f"\n{results['device']}, jax {results['jax']}, bf16 compute; "
    f"median of {_ROUNDS.value} rounds of {_REPS.value} calls"
  )
  print("| model | mode | image, batch | tokens | ms | images/s | model MiB | temp | args | device peak | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results["rows"]:
    case = f"| {r['model']} | {r['mode']} | {r['image_size']}², {r['batch']} | {_num(r.get('tokens'))} |"
    if "error" in r:
      print(f"{case} {r['error'][:80]} | | | | | | |")
      continue
    print(
      f"{case} {r['ms']:.2f} | {r['images_per_s']:,.0f} | {r['model_mib']:,.0f} | {r['temp_mib']:,.0f} | "
      f"{r['argument_mib']:,.0f} | {_num(r['device_peak_mib'])} | {r['compile_s']:.0f} |"
    )
  print("\nFits over the inference grid, x = batch·tokens: ms ≈ a + b·x [+ c·batch·tokens²] (R²)")
  print("| model | linear a, b (R²) | quadratic a, b, c (R²) | memory MiB linear a, b (R²) |")
  print("|---|---|---|---|")
  for spec, fit in results["fits"].items():
    cells = [fit["ms"]["linear"], fit["ms"]["quadratic"], fit["model_mib"]["linear"]]
    text = ["—" if f is None else ", ".join(f"{c:.3g}" for c in f["coef"]) + f" ({f['r2']:.4f})" for f in cells]
    print(f"| {spec} | " + " | ".join(text) + " |")


def _write(results: dict) -> None:
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


def main(argv):
  del argv
  device = jax.devices()[0]
  results = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "reps": _REPS.value}
  results["rows"] = []
  print(f"{device.device_kind} ({device.platform}); jax {jax.__version__}", flush=True)
  for spec in _MODELS.value:
    for mode, cases in (("inference", _CASES.value), ("train", _TRAIN_CASES.value)):
      for case in cases:
        size, batch = map(int, case.split(":"))
        results["rows"].append(_case(spec, mode, size, batch))
        gc.collect()  # drop the case's model and buffers before the next one
        print(json.dumps(results["rows"][-1]), flush=True)
        _write(results)  # what was measured survives a time limit
  results["fits"] = _fits(results["rows"])
  _print_tables(results)
  _write(results)


if __name__ == "__main__":
  app.run(main)
