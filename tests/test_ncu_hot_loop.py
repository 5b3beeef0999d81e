"""experiments/checks/ncu_hot_loop.py reads an Nsight Compute SASS page: its loop, wavefronts and stalls."""

import csv

from experiments.checks import ncu_hot_loop

_HEADER = [
  "Address",
  "Source",
  "Warp Stall Sampling (All Samples)",
  "Instructions Executed",
  "L1 Wavefronts Shared",
  "stall_short_sb",
  "stall_selected",
  "stall_short_sb (Not Issued)",
]


def _write(path, kernels):
  with open(path, "w", newline="") as f:
    out = csv.writer(f)
    for name, rows in kernels:
      out.writerow(["Kernel Name", name])
      out.writerow(_HEADER)
      out.writerows(rows)


def test_the_hot_loop_is_what_runs_most_and_its_counts_are_per_iteration(tmp_path):
  path = tmp_path / "sass.csv"
  loop_runs = 1000
  _write(
    path,
    [
      (
        "scan",
        [
          ["0x0", "  LDC R1, c[0x0][0x28]", "5", "10", "0", "0", "5", "0"],
          ["0x10", "  LDS.128 R16, [R65+0x3000]", "30", str(loop_runs), str(4 * loop_runs), "20", "10", "20"],
          ["0x20", "  @P1 FMUL R13, R8, R32", "10", str(loop_runs), "0", "0", "10", "0"],
          ["0x30", "  EXIT", "1", "950", "0", "0", "1", "0"],
        ],
      ),
      ("other", [["0x0", "  MUFU.EX2 R28, R13", "4", "7", "0", "0", "4", "0"]]),
    ],
  )
  (name, rows), (other, _) = ncu_hot_loop.kernels(str(path))
  assert (name, other, len(rows)) == ("scan", "other", 4)
  text = ncu_hot_loop.report(name, rows, 0)
  assert "loop: 3 instructions per iteration, run 1,000 times" in text  # the 10-times LDC is not in it
  assert "41 of the kernel's 46 stall samples" in text
  assert "wavefronts per iteration: 4.0" in text
  assert "opcodes: LDS 1, FMUL 1, EXIT 1" in text  # a predicate is not the opcode
  assert "stall samples: selected 51%, short_sb 49%" in text  # "Not Issued" columns are not counted twice
  assert "around the loop: 1 instructions run 10 times, 0.3% of those executed and 10.9% of the stall samples" in text
  assert "  - opcodes: LDC 1" in text and "  - stall samples: selected 100%" in text
