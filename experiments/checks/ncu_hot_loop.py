r"""The hottest loop of each kernel in an Nsight Compute report's SASS page: its instructions by opcode, shared-memory
wavefronts and warp-stall samples, per loop iteration, as markdown.

  ncu --clock-control none --set full --import-source no -k regex:mosaic_gpu -c 2 -o report \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py --batch=32 --length=6085 --bidirectional_forward
  ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
  python experiments/checks/ncu_hot_loop.py sass.csv > experiments/results/ncu_..._h100.md

The loop is the instructions executed at least 90% as often as the most executed one. Wavefronts are L1's shared
memory ones (a 128-bit load that every thread of a warp reads from the same 16 bytes still costs 4); stalls are the
sampler's reasons at those instructions, "selected" being the samples where the warp issued.
"""

import collections
import csv
import sys


def kernels(path: str) -> list[tuple[str, list[dict]]]:
  """(name, rows) for each kernel of the CSV, rows keyed by its header."""
  found, header = [], None
  with open(path, newline="") as f:
    for row in csv.reader(f):
      if row and row[0] == "Kernel Name":
        found.append((row[1], []))
      elif row and row[0] == "Address":
        header = row
      elif row and found and header:
        found[-1][1].append(dict(zip(header, row, strict=False)))
  return found


def opcode(source: str) -> str:
  words = source.split()
  return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def number(row: dict, key: str) -> int:
  return int(row.get(key) or 0)


def report(name: str, rows: list[dict], index: int) -> str:
  executed = [number(r, "Instructions Executed") for r in rows]
  most = max(executed)
  loop = [r for r, e in zip(rows, executed, strict=True) if e >= 0.9 * most]
  samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in rows)
  loop_samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in loop)
  wavefronts = sum(number(r, "L1 Wavefronts Shared") for r in loop) / most
  stalls = collections.Counter()
  for r in loop:
    for key, value in r.items():
      if key.startswith("stall_") and "Not Issued" not in key:
        stalls[key.removeprefix("stall_")] += int(value or 0)
  opcodes = collections.Counter(opcode(r["Source"]) for r in loop)
  lines = [
    f"## Kernel {index}: `{name}`",
    "",
    f"- loop: {len(loop)} instructions per iteration, run {most:,} times (per warp); {loop_samples:,} of the kernel's"
    f" {samples:,} stall samples",
    f"- shared-memory wavefronts per iteration: {wavefronts:.1f}",
    "- opcodes: " + ", ".join(f"{op} {n}" for op, n in opcodes.most_common()),
    "- stall samples: " + ", ".join(f"{k} {100 * v / loop_samples:.0f}%" for k, v in stalls.most_common() if v),
    "",
  ]
  return "\n".join(lines)


def main(path: str) -> None:
  print("\n".join(report(name, rows, i) for i, (name, rows) in enumerate(kernels(path))))


if __name__ == "__main__":
  main(sys.argv[1])
