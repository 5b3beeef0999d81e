r"""The hottest loop of each kernel in an Nsight Compute report's SASS page: its instructions by opcode, shared-memory
wavefronts and warp-stall samples, per loop iteration, as markdown.

  ncu --clock-control none --set full --import-source no -k regex:mosaic_gpu -c 2 -o report \
      env PYTHONPATH=. python experiments/checks/scan_profile_once.py --batch=32 --length=6085 --bidirectional_forward
  ncu -i report.ncu-rep --page source --csv --print-source sass > sass.csv
  python experiments/checks/ncu_hot_loop.py sass.csv > experiments/results/ncu_..._h100.md

The loop is the instructions executed at least 90% as often as the most executed one; the code around it, those
executed at least 90% as often as the most executed of the rest (a blocked kernel's code once per block). Wavefronts
are L1's shared memory ones (a 128-bit load that every thread of a warp reads from the same 16 bytes still costs 4);
stalls are the sampler's reasons at those instructions, "selected" being the samples where the warp issued.
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


def _stalls(rows: list[dict]) -> collections.Counter:
  """Stall samples by reason at these instructions ("Not Issued" columns are a subset, not counted twice)."""
  stalls = collections.Counter()
  for r in rows:
    for key, value in r.items():
      if key.startswith("stall_") and "Not Issued" not in key:
        stalls[key.removeprefix("stall_")] += int(value or 0)
  return stalls


def _as_list(counter: collections.Counter, total: int | None = None) -> str:
  if total is None:
    return ", ".join(f"{k} {n}" for k, n in counter.most_common())
  return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in counter.most_common() if v)


def _run_about(rows: list[dict], most: int) -> list[dict]:
  """The instructions executed at least 90% as often as `most` times (and not more)."""
  return [r for r in rows if 0.9 * most <= number(r, "Instructions Executed") <= most]


def report(name: str, rows: list[dict], index: int) -> str:
  """The loop, per iteration, then the code around it (the instructions run next most often: in a blocked kernel,
  once per block), as its shares of the kernel's executed instructions and stall samples."""
  executed = [number(r, "Instructions Executed") for r in rows]
  most = max(executed)
  loop = _run_about(rows, most)
  samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in rows)
  loop_samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in loop)
  wavefronts = sum(number(r, "L1 Wavefronts Shared") for r in loop) / most
  lines = [
    f"## Kernel {index}: `{name}`",
    "",
    f"- loop: {len(loop)} instructions per iteration, run {most:,} times (per warp); {loop_samples:,} of the kernel's"
    f" {samples:,} stall samples",
    f"- shared-memory wavefronts per iteration: {wavefronts:.1f}",
    "- opcodes: " + _as_list(collections.Counter(opcode(r["Source"]) for r in loop)),
    "- stall samples: " + _as_list(_stalls(loop), loop_samples),
  ]
  rest = [e for e in executed if e < 0.9 * most]
  if rest:
    around = _run_about(rows, max(rest))
    share = sum(number(r, "Instructions Executed") for r in around) / sum(executed)
    around_samples = sum(number(r, "Warp Stall Sampling (All Samples)") for r in around)
    lines += [
      f"- around the loop: {len(around)} instructions run {max(rest):,} times, {100 * share:.1f}% of those executed"
      f" and {100 * around_samples / samples:.1f}% of the stall samples",
      "  - opcodes: " + _as_list(collections.Counter(opcode(r["Source"]) for r in around)),
      "  - stall samples: " + _as_list(_stalls(around), around_samples),
    ]
  return "\n".join([*lines, ""])


def main(path: str) -> None:
  print("\n".join(report(name, rows, i) for i, (name, rows) in enumerate(kernels(path))))


if __name__ == "__main__":
  main(sys.argv[1])
