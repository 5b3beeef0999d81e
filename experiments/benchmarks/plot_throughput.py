r"""Plot throughput.py's inference grid like the paper's Figure 1: images/s and memory against resolution.

  PYTHONPATH=. python experiments/benchmarks/plot_throughput.py \
      --inputs=experiments/results/throughput_h100.json --out=experiments/results/throughput_h100.png

Several inputs (e.g. one run per model group) are merged; they must come from the same card. Memory is
`model_mib` (what the compiled forward holds: weights, images, outputs, temporaries). Failed cases (out of
memory) are left out of the lines and marked with an x on the resolution axis. Needs the `bench` extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

_INPUTS = flags.DEFINE_list("inputs", None, "JSON files written by throughput.py.", required=True)
_OUT = flags.DEFINE_string("out", None, "PNG to write.", required=True)


def _load(paths: list[str]) -> tuple[str, list[dict]]:
  """The device and the inference rows of all files; raises if the files come from different cards."""
  results = [json.loads(Path(path).read_text()) for path in paths]
  devices = {r["device"] for r in results}
  if len(devices) > 1:
    raise ValueError(f"inputs come from different devices {sorted(devices)}: compare only numbers from one card")
  rows = [row for r in results for row in r["rows"] if row["mode"] == "inference"]
  return devices.pop(), rows


def plot(device: str, rows: list[dict], out: str) -> None:
  """Two panels, images/s and memory (MiB), both log scale, against image size; one line per model."""
  fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
  sizes = sorted({r["image_size"] for r in rows})
  batches = {r["image_size"]: r["batch"] for r in rows}
  for spec in dict.fromkeys(r["model"] for r in rows):
    ok = sorted((r for r in rows if r["model"] == spec and "error" not in r), key=lambda r: r["image_size"])
    failed = [r["image_size"] for r in rows if r["model"] == spec and "error" in r]
    for axis, key in ((speed, "images_per_s"), (memory, "model_mib")):
      (line,) = axis.plot([r["image_size"] for r in ok], [r[key] for r in ok], marker="o", label=spec)
      bottom = axis.get_xaxis_transform()  # x in data, y in axes coordinates: on the axis whatever the scale
      marks = dict(color=line.get_color(), transform=bottom, clip_on=False, ms=9, in_layout=False)
      axis.plot(failed, [0] * len(failed), "x", **marks)
  speed.set_yscale("log")
  speed.set_ylabel("images / s")
  memory.set_yscale("log")  # XLA attention's quadratic memory would flatten every other line
  memory.set_ylabel("memory (MiB)")
  for axis in (speed, memory):
    axis.set_xticks(sizes, [f"{s}\nb{batches[s]}" for s in sizes])
    axis.set_xlabel("resolution (batch)")
    axis.grid(alpha=0.3)
  speed.legend(fontsize=8)
  fig.suptitle(f"Inference, bf16, {device}  (x: failed, e.g. out of memory)")
  fig.tight_layout()
  fig.savefig(out, dpi=150)


def main(argv):
  del argv
  device, rows = _load(_INPUTS.value)
  plot(device, rows, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
