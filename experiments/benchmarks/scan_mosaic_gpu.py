r"""The scan's forward as a Pallas Mosaic GPU kernel, timed against the Triton kernel that ships.

  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --out=experiments/results/scan_mosaic_gpu_h100.json
  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --cases=1248_b32,224_b128 \
      --layout=rows,half_rows,quarter_rows --block_d=32,64,128 --block_t=32,64 --unroll=1,4 --share_channel_work=0,1
  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --bidirectional --cases=1248_b32 ...
  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --cases=1248_b32 --auto_barriers=0,1 ...
  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --cases=1248_b8,1248_b1 --chunks=1,4,16,32 ...
  PYTHONPATH=. python experiments/benchmarks/scan_mosaic_gpu.py --bidirectional --cases=1248_b32 --layout=quarter_rows \
      --block_d=32 --block_t=64 --unroll=8 --share_channel_work=1 --f32_states=0,1 --state_pairs=0,1 --epilogue=1 \
      --in_place=1

Times the Mosaic GPU forward (`kernels.selective_scan.mosaic_gpu`: one pass over whole sequences, the state in the
register layout `--layout` names) in every setting given, one direction or (`--bidirectional`) Vim's two directions
with the combine, against the shipped Triton call, in bf16 at `scan_common.CASES` shapes; each row has its error
against the reference. `--block_t=0` loads straight from HBM (lowers on jax 0.11 only: 0.12 refuses the
2-byte-per-thread bf16 loads).

NVIDIA H200, jax 0.11.2, thirtieth session (scan_mosaic_gpu_layouts_{1248,224}_h200.json,
scan_mosaic_gpu_bidirectional_h200.json), forward ms: one direction at 1248², batch 32, Triton 1.144, Mosaic 0.991
at best (quarter_rows, block_d 32, block_t 64, shared work), every layout 0.99-1.57; at 224², batch 128, Triton
0.099, Mosaic 0.108 at best (half_rows, block_d 128, block_t 32). Both directions: 2.277 against 1.949 (2.016 in
place) at 1248², 1.585 against 1.327 (1.383) at 1024². Earlier, on an H100 with the WGMMA layout
(scan_mosaic_gpu_h100.json): 1.55 against 1.38 at 1248²; loads straight from HBM were 2.7x slower there. All of these
had Pallas's barriers around every shared-memory store and each position's loads after the last one's store (what
`--auto_barriers=1` comes close to). NVIDIA H100, thirty-fourth session, as `pallas_gpu` now runs it (loads first,
no barriers, f32_states, in place): both directions 1.43 ms at 1248², batch 32 (Triton 2.28, barriers kept 1.65;
scan_mosaic_gpu_bidirectional_no_barriers_h100.json); at batch 8 in 4-16 chunks 0.57-0.60 (Triton 0.76), at batch 1
in 32 chunks 0.10 (Triton 0.28; scan_mosaic_gpu_bidirectional_chunks_1248_b8_b1_h100.json). Thirty-fifth session
(H100): the epilogue and unroll 8 took both directions at 1248², batch 32 from 1.441 to 1.376 ms
(scan_mosaic_gpu_epilogue_unroll_1248_h100.json).
"""

import functools
import itertools

from absl import app, flags

from experiments.benchmarks.scan_common import compare_forwards
from kernels.selective_scan.mosaic_gpu import LAYOUTS, bidirectional, forward

_CASES = flags.DEFINE_list("cases", ["224_b128", "224s8_b128", "1248_b32"], "Shapes (scan_common.CASES).")
_BLOCK_D = flags.DEFINE_list("block_d", ["64", "128"], "Channels per warpgroup.")
_BLOCK_T = flags.DEFINE_list("block_t", ["0", "16", "32"], "Positions per shared-memory block (0: no staging).")
_UNROLL = flags.DEFINE_list("unroll", ["1", "4"], "Positions per loop iteration.")
_LAYOUT = flags.DEFINE_list("layout", ["wgmma"], f"State tile layouts ({', '.join(LAYOUTS)}).")
_SHARE = flags.DEFINE_list("share_channel_work", ["0"], "0, 1 or both: each block's softplus and gate computed once.")
_BIDIRECTIONAL = flags.DEFINE_bool(
  "bidirectional", False, "Time Vim's two directions and their combine (`bidirectional`) against the fused Triton call."
)
_IN_PLACE = flags.DEFINE_list("in_place", ["0"], "With --bidirectional, 0, 1 or both: each y over an input.")
_SHARE_STEP_U = flags.DEFINE_list(
  "share_step_u", ["0"], "0, 1 or both: with the epilogue, each block's step size times u also computed once."
)
_F32_STATES = flags.DEFINE_list(
  "f32_states", ["0"], "0, 1 or both: with shared work, B's and C's rows also converted to float32 once per block."
)
_STATE_PAIRS = flags.DEFINE_list(
  "state_pairs", ["0"], "0, 1 or both: with shared work, B and C as bf16 pairs in one word per state (not with f32)."
)
_EPILOGUE = flags.DEFINE_list(
  "epilogue", ["0"], "0, 1 or both: with shared work, y's skip, combine and gate in a pass over each block."
)
_SCATTER_SUMS = flags.DEFINE_list(
  "scatter_sums", ["0"], "0, 1 or both: with the epilogue (quarter_rows), y's sums over the state reduce-scattered."
)
_STAGES = flags.DEFINE_list("stages", ["2"], "Blocks' copies in flight at once (emit_pipeline's max_concurrent_steps).")
_CHUNKS = flags.DEFINE_list("chunks", ["1"], "Chunks per sequence (a launch for their end states first, if > 1).")
_AUTO_BARRIERS = flags.DEFINE_list(
  "auto_barriers", ["0"], "0, 1 or both: Pallas's barriers around each shared-memory store (left out by default)."
)
_REPS = flags.DEFINE_integer("reps", 30, "Timed calls per setting.")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results.")


def main(argv):
  del argv
  in_place = _IN_PLACE.value if _BIDIRECTIONAL.value else ["0"]
  variants = {
    f"mosaic {layout} block_d={d} block_t={t} unroll={u} share={share}"
    + (" step_u" if su == "1" else "")
    + (" f32_states" if f32 == "1" else "")
    + (" state_pairs" if pairs == "1" else "")
    + (" epilogue" if epilogue == "1" else "")
    + (" scatter_sums" if scatter == "1" else "")
    + (f" stages={stages}" if stages != "2" else "")
    + (f" chunks={chunks}" if chunks != "1" else "")
    + (" in_place" if place == "1" else "")
    + (" auto_barriers" if barriers == "1" else ""): (
      functools.partial(
        functools.partial(bidirectional, in_place=place == "1") if _BIDIRECTIONAL.value else forward,
        block_d=int(d),
        block_t=int(t),
        unroll=int(u),
        layout=layout,
        share_channel_work=share == "1",
        share_step_u=su == "1",
        f32_states=f32 == "1",
        state_pairs=pairs == "1",
        epilogue=epilogue == "1",
        scatter_sums=scatter == "1",
        stages=int(stages),
        chunks=int(chunks),
        auto_barriers=barriers == "1",
      )
    )
    for layout, d, t, u, share, su, f32, pairs, epilogue, scatter, stages, chunks, place, barriers in itertools.product(
      _LAYOUT.value,
      _BLOCK_D.value,
      _BLOCK_T.value,
      _UNROLL.value,
      _SHARE.value,
      _SHARE_STEP_U.value,
      _F32_STATES.value,
      _STATE_PAIRS.value,
      _EPILOGUE.value,
      _SCATTER_SUMS.value,
      _STAGES.value,
      _CHUNKS.value,
      in_place,
      _AUTO_BARRIERS.value,
    )
    if int(d) % LAYOUTS[layout][1] == 0
    and (share == "1" or f32 == pairs == epilogue == "0")
    and not (f32 == pairs == "1")
    and (scatter == "0" or (epilogue == "1" and layout == "quarter_rows"))
    and (su == "0" or epilogue == "1")
  }
  compare_forwards(_CASES.value, variants, _REPS.value, _OUT.value, bidirectional=_BIDIRECTIONAL.value)


if __name__ == "__main__":
  app.run(main)
