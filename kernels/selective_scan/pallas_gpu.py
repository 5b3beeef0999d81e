"""Selective scan as Pallas GPU kernels on the Triton backend: fused forward and backward.

Triton rather than Mosaic GPU (the backend Pallas is moving to), for now and by measurement. A Mosaic GPU
forward (`mosaic_gpu`: one pass over whole sequences, one warpgroup per block of channels, inputs staged through
shared memory by TMA) takes 40% less time for Vim's two directions than the chunked Triton passes at 1248², batch 32
(H100), and `bidirectional` and `scan` (one direction, with its last state) run it where nothing is differentiated
and it fits (`mosaic_gpu.fits`: long sequences, bf16, Hopper; in chunks where the batch is small): Vim-Ti's forward
at 1248², batch 32 51.8 against 74.5 ms, at batch 8 19.3 against 23.9 (H100). It was slower at 224², it has no
backward, and Mosaic GPU's API still moves. Triton runs on jax 0.11 and 0.12; it is deprecated since 0.11 (lowering
warns), so the port of the rest is due.

Fused like the official CUDA kernel: the kernels read the raw arguments in their own dtype (bf16 or f32)
and do all per-position work in float32 registers: delta + delta_bias, softplus, the recurrence,
y = <h, C> + D u and the silu(z) gate. The forward reads u, delta, z, B, C once and writes y once; no
float32 copy of anything crosses HBM, and the (batch, length, channels, state) states never do. In float32,
exp, sigmoid and multiply-adds are single PTX instructions (`ptx`): jaxlib's Triton pipeline compiles the jnp
forms to libdevice's exact ones and contracts no multiply-add (forward 14% faster, H200). softplus's log1p is a
series or the hardware's lg2 (`ptx.log1p`): 11% fewer instructions in the forward's loop, and Vim-Ti's forward
at 1248², batch 32 5.7% faster (H200).

Each program owns `block_d` channels of one chunk of one sequence, with their (block_d, state) state in
registers, and walks the chunk one position at a time. Triton tensors need power-of-two sizes, so
channels are zero-padded to a multiple of `block_d` and state to a power of two (A = B = C = 0 there
keeps padded entries at h = 0); the length is never padded: a chunk past the end stops at the last
position (a partial sub-chunk re-reads it as an identity step, delta = 0, whose writes repeat a value).

Where a forward pass has few programs (`BY_CHANNEL_PROGRAMS`), it holds the state by channel instead
(`_forward_by_channel_kernel`): as `state` vectors of the block's channels, so that Triton gives each thread one
channel's whole state. B and C are then per-position rows that every thread reads whole (bf16 as uint32 pairs,
unpacked by a shift and a mask; 4 words per 128-bit load, `ROW_VECTOR`), y's sum over the state is a chain of
multiply-adds in the thread, and no value goes through shared memory between per-channel and per-element layouts.
Offline SASS shows a few more instructions per position (each thread converts all of B and C), but with ~12 one-warp
programs per SM the tiles' shared-memory round trips and shuffles stall more: Vim-Ti's forward at 224², batch 128
went from 7.91-7.99 to 7.67-7.72 ms (H200, ab_forward_by_channel_vim_tiny_h200.json); at 1248², batch 32 (9,216
programs per pass) the tiles are faster (fused bidirectional forward 2.40 against 2.52 ms,
scan_tune_by_channel_h200.txt). One pass over whole sequences there, by channel or as tiles, with or without each
channel's state spread over 2-8 threads, took 3.0-4.4 ms against 2.21 for the two chunked passes (H200,
scan_tune_one_pass_1248_h200.txt).

Long sequences are split into chunks of at most `CHUNK` positions when the sequences alone give fewer
than `FILLING_PROGRAMS` programs (`FORWARD_FILLING_PROGRAMS` where nothing is differentiated), so that a
small batch still fills the GPU: pass 1 scans every chunk from a zero state, keeping its end state and
total step size; pass 2 rescans every chunk from its true start state and writes y. Each pass-2 program
first carries the state across the chunks before its own (h -> exp(A Σ delta) h + end state, at most
chunks - 1 steps of one (block_d, state) tile, each chunk's loads issued a step ahead): no XLA loop over chunks (at
1248², batch 32, Vim-Ti's forward spent 5.6 of its 113 ms in the 2,300 tiny kernels of one, H100).

Backward (`jax.custom_vjp`; residuals are the inputs plus, with several chunks, each chunk's start state
and total step size). The adjoint g_t = dL/dh_t runs against the scan: g_t = silu(z_t) dy_t C_t +
exp(delta_{t+1} A) g_{t+1}, and every gradient is a product of g_t, h_{t-1} or h_t and the inputs at t.
The states are recomputed: a forward pass from the chunk start states (the states pass) writes the state
at the start of every sub-chunk of `SUB_CHUNK` positions (1/SUB_CHUNK of the full tensor, freed within the
backward; bf16 for bf16 inputs, `_states_dtype`) and dC = Σ_channels dy_t h_t, which needs no adjoint;
the gradient kernel walks the sub-chunks backwards, recomputes each one's states into registers (unrolled:
registers cannot be indexed dynamically), then walks its positions backwards. With several chunks, the
adjoint entering each chunk from later ones is carried like the forward state: a zero-start adjoint pass per
chunk, whose results the gradient kernel carries across the chunks after its own. dB and dC (sums over
channels) come out per channel block, dA, dD and d(delta_bias) (sums over positions) per chunk; XLA adds the
partial sums, but dB's and dC's in one launch of `sum_over_blocks` where batch x length fills its programs whole
(`_summed_over_blocks`). The z gate's backward is XLA's (`gate_backward`, from the ungated output the forward
keeps), so every backward kernel runs ungated: one gated direction's forward+backward, bf16, H100, 0.617 -> 0.536 ms
at 224², batch 128, 2.335 -> 1.885 at 224², stride 8, 1.662 -> 1.513 at 1248², batch 8, 0.778 -> 0.678 at 1248²,
batch 1 (fifty-fourth session, scan_one_gated_gate_in_{kernel,xla}*_h100.json). The fused bidirectional call runs
both directions' gradient kernels in one launch (`_launch`): at 218 registers (168 offline now) an H100 held only
1,188 of their programs at once. The gradient kernels go one sub-chunk at a time there; the states passes load two
ahead where programs are few (`PAIRED_STATES_PROGRAMS`). One direction's gradient kernel runs pairs of sub-chunks,
capped at `GRAD_MAX_REGISTERS` (`triton_registers`: Triton's `maxnreg`, which jax does not expose): 22% off that
direction's forward+backward at 224², batch 128 (H100).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.selective_scan import mosaic_gpu, mosaic_gpu_backward, ptx, triton_registers
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.negative_exp import NegativeExp
from kernels.selective_scan.padding import compute_dtype, pad_to, plain
from kernels.selective_scan.softplus import silu_grad, softplus, softplus_grad

# Chosen with experiments/benchmarks/scan_tune.py on an H100 (bf16; scan_tune_h100.json and, with the loads
# pipelined, scan_tune_pipelined_h100.json): 32 channels x 1 warp and 64 x 2 are within 5% of each other,
# other pairs up to 2.7x slower. The backward keeps one state per sub-chunk of SUB_CHUNK positions and holds
# the sub-chunk's states in registers: 2 is fastest (224² batch 128, forward+backward 0.86 ms against 1.13
# at 4 and 2.36 at 8, where the states spill), at the price of a transient buffer of half of all states
# (freed within the backward; `sub_chunk=8` shrinks it to an eighth). The forward keeps no states; 4
# positions of loads ahead are fastest for it where programs are few (1248², batch 1: 0.49 ms against 0.76 at 2).
# CHUNK bounds the positions one program walks when there are fewer than FILLING_PROGRAMS (batch x channel
# blocks) of whole sequences (long sequences then fill the GPU at batch 1). Splitting costs a second pass,
# so it pays only where programs are scarce (scan_tune_max_chunk*_h100.json, Vim-Ti, forward / forward+backward
# in ms, chunks of 256 against whole sequences): 1.55 / 6.76 against 2.18 / 12.3 at 1248², batch 32 (384
# programs); 1.12 / 4.82 against 0.98 / 4.94 at 736², batch 64 (768); 1.06 / 4.63 against 0.64 / 4.19 at
# 512², batch 128 (1,536); 0.77 / 3.58 against 0.45 / 2.98 at 224² stride 8, batch 128 (1,536). A forward
# alone is faster whole from 768 programs on, so inference (the custom_vjp's primal) splits only below that:
# Vim-Ti's forward at 736², batch 64 went from 71.4 to 64.6 ms (ab_inference_chunk_rule_vim_tiny_736_h100.json).
BLOCK_D = 32
NUM_WARPS = 1
NUM_STAGES = 2
CHUNK = 256
FILLING_PROGRAMS = 1024
FORWARD_FILLING_PROGRAMS = 768
SUB_CHUNK = 2
FORWARD_SUB_CHUNK = 4
# The (channels, state) tiles forward, which runs where programs are many (`BY_CHANNEL_PROGRAMS`), loads 2
# positions ahead: Vim-Ti's fused bidirectional forward at 1248², batch 32 took 2.20 against 2.39 ms at 4
# (1024², batch 32: 1.54 against 1.68; H200, scan_tune_forward_sub_chunk_h200.txt). 4 stays for the by-channel
# forward, which holds more registers per position (its B and C rows) and was slower at 2 (twenty-first session).
# The tiles forward also runs pairs of its sub-chunks (`_Plan.paired_forward`): Nsight Compute put 14% of its output
# pass's stall samples on two multiply-adds waiting on the long scoreboard (global loads), though neither reads a
# loaded value (scan_ncu_forward_1248_h200.txt). A warp has six scoreboards; in the offline SASS the ex2s set the same
# ones as the next sub-chunk's loads issued before them, so a use of an ex2 waited for those loads too. Paired, the
# next loads are issued half a loop later.
# Fused bidirectional forward, H200, three rounds each: 1248², batch 32, 2.207-2.212 -> 2.186-2.193 ms; 1024²,
# batch 32, 1.539-1.549 -> 1.515-1.521. By channel (736², batch 64) pairing took 2.28 against 1.37 ms, so only the
# tiles pair (twenty-seventh session, scan_tune_paired_forward_h200.txt).
TILES_FORWARD_SUB_CHUNK = 2
# The by-channel forward reads B's and C's rows this many 32-bit words at a time: 4 loads per position where 16 scalar
# ones were (bf16, state 16). Offline sm_90 SASS, 224², batch 128: 171 -> 160 and 193.5 -> 190.75 instructions per
# position for the bidirectional call's two directions, 181.75 -> 168.25 for one gated scan; on an H200 the fused
# bidirectional forward went from 0.191 to 0.178 ms at 224², batch 128 and 0.317 to 0.279 at 1248², batch 1, and
# Vim-Ti's forward at 224², batch 128 from 7.65 to 7.13 ms (twenty-fifth session, results README).
ROW_VECTOR = 4
# The forward passes go by channel up to this many programs (batch x channel blocks x chunks): one wave of
# programs on an H100 or H200 at 224², batch 128 (1,536 per direction), tiles at 1248², batch 32 (9,216).
BY_CHANNEL_PROGRAMS = 2048
# The backward's states pass loads two sub-chunks ahead (`_Plan.paired_states`) up to this many programs, also where
# the gradient kernel goes one sub-chunk at a time (the fused bidirectional backward). With ~12 one-warp programs per
# SM it waited on its loads (62-65% of Nsight Compute's samples, fifteenth session, `scan_ncu_bidir_h200.txt`);
# paired, the nearest use of a load is 125 SASS instructions after it instead of 25 (offline, 128 registers against
# 102). Fused bidirectional backward on an H200, bf16: 0.785 -> 0.755 and 0.759 -> 0.730 ms at 224², batch 128 (two
# processes), 2.80 -> 2.75 at 224² stride 8; at 1248², batch 32 (9,216 programs, many warps per SM) 6.09 against 6.13
# paired, so not there (twenty-sixth session, scan_tune_paired_states_h200.txt).
PAIRED_STATES_PROGRAMS = 2048
# Registers a thread of the gradient kernel may take where it runs pairs of sub-chunks (`triton_registers`; None: as
# many as ptxas likes). Paired, it took 255 registers (offline, Triton 3.5: 8 one-warp programs a multiprocessor);
# capped at 168 it spills ~400 bytes and 12 fit. One ungated direction forward+backward, bf16, H100 (fifty-second
# session, scan_register_cap_224_h100.json): 0.497 -> 0.388 ms at 224², batch 128; 1.709 -> 1.355 at 224², stride 8.
# Of the caps tried at 224², batch 128 (backward alone: 0.421 ms uncapped, 0.365 at 200, 0.381 at 184, 0.286 at 168,
# 0.328 at 152; in another run 0.403 uncapped, 0.454 at 128) 168 was fastest; at 1248², batch 8 (chunks) it was
# neutral (forward+backward 1.307 -> 1.321 ms), 184 and 200 slower (1.44, 1.45; 1.31 uncapped). One sub-chunk at a
# time (the fused bidirectional backward) the kernel takes 168 uncapped (offline), and capping it there changed
# nothing but spills: Vim-Ti's training step 32.20 against 32.26 ms capped; capped lower, that backward only got slower
# (both directions forward+backward at 224², batch 128: 0.920 ms uncapped, 1.019 at 144, 1.227 at 128, 1.664 at 112;
# fifty-third session). The kernels' own gate backward held more registers and was slower capped (one gated direction
# forward+backward 0.617 -> 0.671 ms at 224², batch 128, 1.638 -> 1.923 at 1248², batch 8; H100, fifty-third
# session, scan_register_cap_gated_h100.txt); the gate's backward is XLA's now (`gate_backward`), so every gradient
# kernel runs ungated and the paired one capped.
GRAD_MAX_REGISTERS = 168
# The states pass stores each bf16 state through indices that show Triton runs of 4 states (`_in_runs_of_four`), not
# 16: Triton then stores 8 bytes per thread, not 16, and lays the (channels, state) tile over 8 x 4 threads as for
# float32 states, not 16 x 2, so dC's sum over the channels crosses 8 lanes, not 16. Offline (sm_90, Vim-Ti's fused
# bidirectional backward at 224², batch 128): 910 -> 757 SASS instructions per 4 positions of its loop (shuffles
# 152 -> 48), 128 -> 93 registers (thirty-second session). Fused bidirectional backward on an H100, bf16: 6.79 against
# 6.98-7.00 ms at 1248², batch 32, but 0.747 against 0.731-0.746 at 224², batch 128, within the spread
# (scan_tune_narrow_states_h100.txt). Vim-Ti's training step at 224², batch 128 does not tell them apart: 33.43 ms
# against 33.36 without (rounds 33.30-33.49 and one of 39.3, against 33.33-33.42; H100, fortieth session, model_ab.py,
# ab_narrow_states_store_vim_tiny_h100.txt). It is on for bf16 kept states, for the backward at long sequences;
# float32 ones were not timed. The gradient kernel reading the states so as well took 0.92 and 8.45 ms (168 -> 209
# registers offline), so it reads them whole.
NARROW_STATES_STORE = True
# The fused bidirectional backward runs `mosaic_gpu_backward`'s gradient kernel per direction where it fits
# (`_mosaic_backward_fits`) instead of the Triton states pass and gradient kernel. Off: right on an H100, but no faster
# than theirs at 224², batch 128 (0.438 against 0.409 ms one direction, fifty-first session,
# scan_mosaic_backward_224_b128_first_h100.json); its register-saving options left it at 148-167 registers and 0.430
# at best (fifty-second session, scan_mosaic_backward_224_b128_candidates_h100.json: Mosaic GPU caps no kernel's
# registers). `model_ab.py` times it in the training step with it on in the working tree.
MOSAIC_BACKWARD = False


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The static geometry and options shared by the kernels of one call."""

  batch: int
  length: int
  chunk: int
  num_chunks: int
  sub_chunk: int  # positions per step of the loop; the backward keeps a state per sub-chunk
  forward_sub_chunk: int  # the same for the forward passes, which keep no states (a divisor of chunk)
  block_d: int
  channels: int  # padded to a multiple of block_d
  state: int  # padded to a power of two
  reverse: bool
  softplus: bool
  gated: bool  # z given
  dtype: jnp.dtype  # of the math: float32, or float64 for float64 inputs
  num_warps: int
  interpret: bool
  # `_Chunk.over_sub_chunks` runs pairs of sub-chunks (a one-direction scan's backward; the forward passes through
  # `paired_forward`, the states pass through `paired_states`), not one at a time.
  paired: bool = True
  # Set for the second direction of a fused bidirectional scan: y = (y + partner) * combine, then gated,
  # where partner is the first direction's ungated output.
  combine: float | None = None
  # B's and C's column block in the arrays the kernels read: a `Columns` window read in place, or None for
  # a (batch, length, state) array (`_read_in_place`).
  columns: tuple[int | None, int | None] = (None, None)
  # z's first block of block_d columns in the array the kernels read: a `Columns` window read in place (in_proj's
  # output), or None for a (batch, length, channels) array (`_read_z_in_place`).
  z_column: int | None = None
  # A given as its log (`NegativeExp`): the kernels compute A = -exp(A_log) from the block they load.
  a_log: bool = False
  # The forward passes hold the state as `state` vectors of channels (`_forward_by_channel_kernel`).
  by_channel: bool = False
  # B and C come as uint32 words of two bf16 (the by-channel forward's per-position rows, halved).
  packed: bool = False
  # The backward's states pass runs pairs of sub-chunks even if `paired` is off (`PAIRED_STATES_PROGRAMS`).
  paired_states: bool = False
  # Of the states the backward's states pass keeps for its gradient kernel (`_states_dtype`).
  states_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  # The states pass stores them in runs of 4 states (`NARROW_STATES_STORE`).
  narrow_states_store: bool = False
  # The forward passes run pairs of sub-chunks too (the tiles forward, `TILES_FORWARD_SUB_CHUNK`).
  paired_forward: bool = False

  @property
  def native(self) -> bool:
    """Whether exp, sigmoid and multiply-adds are written as PTX (`ptx`)."""
    return ptx.native_for(self.dtype, interpret=self.interpret)

  @property
  def sub_chunks(self) -> int:
    return self.chunk // self.sub_chunk

  def forward(self) -> "_Plan":
    """This plan for the forward passes: their loads run `forward_sub_chunk` positions ahead, in pairs of sub-chunks
    with `paired_forward`."""
    return dataclasses.replace(self, sub_chunk=self.forward_sub_chunk, paired=self.paired_forward)

  def grid(self) -> tuple[int, int, int]:
    return self.batch, self.channels // self.block_d, self.num_chunks


class _Refs(NamedTuple):
  """One program's blocks of the scan's arguments (z is None without a gate, partner without a combine)."""

  u: jax.Array
  delta: jax.Array
  A: jax.Array
  B: jax.Array
  C: jax.Array
  D: jax.Array
  bias: jax.Array
  z: jax.Array | None
  partner: jax.Array | None


def _split_refs(refs, plan: _Plan):
  """(the argument refs, the refs after them)."""
  refs = list(refs)
  z = refs.pop(7) if plan.gated else None
  partner = refs.pop(7) if plan.combine is not None else None
  return _Refs(*refs[:7], z, partner), refs[7:]


class _Chunk:
  """This program's chunk: its positions in scan order, and the inputs at a position, in float32."""

  def __init__(self, refs: _Refs, plan: _Plan, index):
    self.refs, self.plan, self.index = refs, plan, index  # index: the chunk's, in the sequence
    self.size = jnp.minimum(plan.chunk, plan.length - index * plan.chunk)  # the last may be short
    self.sub_chunks = (self.size + plan.sub_chunk - 1) // plan.sub_chunk
    self.A = self.a_of(refs.A[...])  # unused by the by-channel forward (it loads A by column), so compiled away
    self.D = refs.D[...].astype(plan.dtype)
    self.bias = refs.bias[...].astype(plan.dtype)

  def a_of(self, loaded):
    """A from a load of the A ref: -exp(A_log) for `plan.a_log`, computed once per program with the accurate exp,
    not the hardware's ex2."""
    loaded = loaded.astype(self.plan.dtype)
    return -jnp.exp(loaded) if self.plan.a_log else loaded

  def position(self, step):
    """The position of scan step `step` (< size) within the chunk."""
    return self.size - 1 - step if self.plan.reverse else step

  def clamped(self, step):
    """(position, whether the step is real): steps past the chunk's end re-read its last position."""
    return self.position(jnp.minimum(step, self.size - 1)), step < self.size

  def load(self, ref, t):
    return ref[t, :].astype(self.plan.dtype)

  def step_size(self, t, real=True):
    """The pre-softplus step x and the step size delta at t; delta = 0 (an identity step) if not real."""
    return self.step_size_of(self.refs.delta[t, :], real)

  def step_size_of(self, delta, real):
    """`step_size` from delta as loaded."""
    x = delta.astype(self.plan.dtype) + self.bias
    delta = softplus(x, self.exp, self.log1p) if self.plan.softplus else x
    return x, jnp.where(real, delta, 0.0)

  def exp(self, x):
    return ptx.exp(x, native=self.plan.native)

  def log1p(self, x):
    return ptx.log1p(x, native=self.plan.native)

  def sigmoid(self, x):
    return ptx.sigmoid(x, native=self.plan.native)

  def silu(self, x):
    return ptx.silu(x, native=self.plan.native)

  def over_sub_chunks(self, body, init, load, *, backwards: bool = False):
    """`fori_loop` over the sub-chunks (last first if `backwards`) of carry = body(j, load(j), carry),
    software-pipelined: each sub-chunk's loads (`sub_chunk`) are issued one sub-chunk ahead, so that they
    are in flight while the one before computes. (A load issued after a store waits for it, as they might
    alias: loads at the top of each sub-chunk would expose one memory latency per sub-chunk.)

    With `plan.paired` (a one-direction scan's backward) the loop runs pairs of sub-chunks and `body` converts the
    loads (`positions`). A use right after a load waits for it, and a loop carrying one sub-chunk's loads
    copies them into its carried registers at its end, waiting there too; one sub-chunk at a time, the
    gradient kernel used a load 38 instructions after it at the nearest, paired 178 (offline SASS,
    experiments/checks/kernel_registers.py). Here the second sub-chunk's loads are issued before the
    first runs and the next pair's first after it, so what the loop carries are the loads' own registers.
    An odd count gets one sub-chunk past the end (identity steps), so paired chunks are whole pairs
    (`_plan`). The by-channel forward goes one sub-chunk at a time, converting as it loads: paired, it needs more
    registers (168 against 158 for the bidirectional second direction, offline) and Vim-Ti's forward at 224², batch
    128 measured slower (ab_paired_loads_h100.json). So do the fused bidirectional backward's gradient kernels
    (`bidirectional`). The tiles forward is paired (`TILES_FORWARD_SUB_CHUNK`)."""
    if not self.plan.paired:

      def index(i):
        return self.sub_chunks - 1 - i if backwards else i

      return _loop_loading_ahead(self.sub_chunks, index, load, body, init)

    pairs = (self.sub_chunks + 1) // 2

    def paired_index(i):
      return 2 * pairs - 1 - i if backwards else i

    def pair(i, carry):
      carry, first = carry
      second = load(paired_index(2 * i + 1))
      carry = body(paired_index(2 * i), first, carry)
      upcoming = load(paired_index(jnp.minimum(2 * i + 2, 2 * pairs - 1)))  # the last pair re-reads its second
      return body(paired_index(2 * i + 1), second, carry), upcoming

    return jax.lax.fori_loop(0, pairs, pair, (init, load(paired_index(0))))[0]

  def sub_chunk(self, j, *, C: bool = False, z: bool = False, extra=None) -> list:
    """What the steps of sub-chunk j read: `_Loads` as loaded for a paired plan, else each load converted
    as it is issued (`_Position`s, softplus right after delta's load: the order the forward was timed in).
    `positions` makes `_Position`s of either."""
    paired = self.plan.paired
    read = (lambda ref, t: ref[t, :]) if paired else self.load
    steps = []
    for k in range(self.plan.sub_chunk):
      t, real = self.clamped(j * self.plan.sub_chunk + k)
      delta = read(self.refs.delta, t)
      step_size = None if paired else self.step_size_of(delta, real)
      optional = [read(ref, t) if wanted else None for ref, wanted in ((self.refs.C, C), (self.refs.z, z))]
      extra_t = None if extra is None else read(extra, t)
      loads = _Loads(t, real, read(self.refs.u, t), delta, read(self.refs.B, t), *optional, extra_t)
      steps.append(loads if paired else self._position(loads, step_size))
    return steps

  def positions(self, steps: list) -> list["_Position"]:
    """`sub_chunk`'s steps in the compute dtype."""
    if not self.plan.paired:
      return steps
    return [self._position(loads, self.step_size_of(loads.delta, loads.real)) for loads in steps]

  def _position(self, loads: "_Loads", step_size) -> "_Position":
    u, B, C, z, extra = (
      None if v is None else v.astype(self.plan.dtype) for v in (loads.u, loads.B, loads.C, loads.z, loads.extra)
    )
    return _Position(loads.t, loads.real, u, *step_size, B, C, z, extra)


class _Loads(NamedTuple):
  """One position's loads in the refs' dtypes (C, z and extra only where asked for)."""

  t: jax.Array
  real: jax.Array
  u: jax.Array
  delta: jax.Array
  B: jax.Array
  C: jax.Array | None
  z: jax.Array | None
  extra: jax.Array | None


class _Position(NamedTuple):
  """The inputs of one scan step, in the compute dtype (C, z and extra only where asked for)."""

  t: jax.Array
  real: jax.Array  # False for a step past the chunk's end (an identity step)
  u: jax.Array
  x: jax.Array  # delta + delta_bias, before softplus
  delta: jax.Array
  B: jax.Array
  C: jax.Array | None
  z: jax.Array | None
  extra: jax.Array | None  # the partner's y (forward) or dy (backward)


def _decay(chunk: _Chunk, delta):
  """exp(delta A) as exp2(delta log2(e) A), as the official kernel: a multiply and the hardware's ex2,
  where exp compiles to ten instructions. log2(e) scales delta, so no second (block_d, state) tile of A."""
  return ptx.exp2((delta * math.log2(math.e))[:, None] * chunk.A, native=chunk.plan.native)


def _step(chunk: _Chunk, h, p: _Position):
  """One step of the recurrence."""
  return _fma(chunk, _decay(chunk, p.delta), h, (p.delta * p.u)[:, None] * p.B[None, :])


def _fma(chunk: _Chunk, a, b, c):
  """a * b + c in one instruction on the GPU (`ptx.fma`)."""
  return ptx.fma(a, b, c, native=chunk.plan.native)


def _entering(chunk: _Chunk, refs: list, start: str, *, reverse: bool, ahead: bool = True) -> jax.Array:
  """The value entering this program's chunk, reading (and popping) the refs that `start` names:
  "zero"; "given" (a ref holding it); "carried" (local, total: c -> exp(A total_j) c + local_j over the
  chunks before this one in scan order, `reverse` or not, from zero, loading a chunk ahead if `ahead`);
  "carried_from" (init, local, total: the same from init)."""
  plan = chunk.plan
  zero = jnp.zeros((plan.block_d, plan.state), plan.dtype)
  if start == "zero":
    return zero
  if start == "given":
    return refs.pop(0)[...].astype(plan.dtype)
  init = refs.pop(0)[...].astype(plan.dtype) if start == "carried_from" else zero
  local_ref, total_ref = refs.pop(0), refs.pop(0)

  def update(c, loaded):
    total, local = loaded
    return _fma(chunk, _decay(chunk, total), c, local)

  def load(j):
    return total_ref[j, :], local_ref[j, :, :]

  return _over_earlier_chunks(chunk, load, update, init, reverse=reverse, ahead=ahead)


def _over_earlier_chunks(chunk: _Chunk, load, update, init, *, reverse: bool, ahead: bool = True):
  """c -> update(c, load(j)) over the chunks j before this one in scan order (`reverse` or not), from init, with
  each chunk's loads issued one step ahead if `ahead`. Loaded where used, this loop had 5.6% of the stall samples
  of the forward's output pass at 1248², batch 32 for 1.7% of its instructions, waiting on its loads
  (scan_ncu_forward_1248_h200.txt); a step ahead, one direction's forward there went from 1.127 to 1.117 ms and the
  fused bidirectional one from 2.166 to 2.154 (H200). The gradient kernel's adjoint carry does not load ahead: its
  forward+backward took 5.06 against 4.94 ms so (ab_carry_ahead_h200.txt)."""
  k, last = chunk.index, chunk.plan.num_chunks - 1
  steps = last - k if reverse else k

  def index(i):
    return last - i if reverse else i

  if not ahead:
    return jax.lax.fori_loop(0, steps, lambda i, c: update(c, load(index(i))), init)
  return _loop_loading_ahead(steps, index, load, lambda j, loaded, c: update(c, loaded), init)


def _loop_loading_ahead(count, index, load, body, init):
  """`fori_loop` over i < count of carry = body(index(i), load(index(i)), carry), with each step's loads issued
  during the step before (the last step re-reads its own)."""

  def step(i, carry):
    carry, loaded = carry
    upcoming = load(index(jnp.minimum(i + 1, count - 1)))
    return body(index(i), loaded, carry), upcoming

  return jax.lax.fori_loop(0, count, step, (init, load(index(0))))[0]


def _write_y(chunk: _Chunk, out: dict, t, y, partner, z) -> None:
  """Writes y = <h, C> + D u at t: combined with the partner direction's y (`plan.combine`; the ungated sum too,
  if asked for), then gated."""
  plan = chunk.plan
  if plan.combine is not None:
    y = (y + partner) * plan.combine
  if "ungated" in out:
    out["ungated"][t, :] = y.astype(out["ungated"].dtype)
  if plan.gated:
    y = y * chunk.silu(z)
  out["y"][t, :] = y.astype(out["y"].dtype)


def _forward_kernel(*refs, plan: _Plan, chunk_index, outputs: tuple[str, ...], start: str):
  """Scans one (sequence, channel block, chunk) from its start state (`_entering`). `outputs` names the
  output refs: "y", "sub_chunk_states" (the state entering each sub-chunk), "start_state", "end_state",
  "total_delta", "ungated" (y before the gate), "dC" (C's gradient per channel block, Σ dy h over the block's
  channels: the backward's states pass, which then reads y's cotangent dy before the start refs)."""
  args, refs = _split_refs(refs, plan)
  chunk = _Chunk(args, plan, chunk_index)
  dy_ref = refs.pop(0) if "dC" in outputs else None
  h0 = _entering(chunk, refs, start, reverse=plan.reverse)
  out = dict(zip(outputs, refs, strict=True))
  if "start_state" in out:
    out["start_state"][...] = h0

  writes_y = "y" in out

  def step(p: _Position, carry):
    h, total = carry
    h = _step(chunk, h, p)
    if writes_y:
      # Multiply-and-sum rather than a dot: Triton dots need 16-wide operands and may use TF32.
      # A step past the end repeats the last position's step as an identity, so rewrites its y.
      _write_y(chunk, out, p.t, jnp.sum(h * p.C[None, :], axis=1) + chunk.D * p.u, p.extra, p.z)
    if dy_ref is not None:
      # A step past the end repeats the last position's (h unchanged), so rewrites the same dC.
      out["dC"][p.t, :] = jnp.sum(p.extra[:, None] * h, axis=0)
    return h, total + p.delta

  def load(j):
    extra = args.partner if writes_y else dy_ref
    return chunk.sub_chunk(j, C=writes_y, z=plan.gated and writes_y, extra=extra)

  def sub_chunk(j, steps, carry):  # unrolled
    if "sub_chunk_states" in out:
      ref = out["sub_chunk_states"]
      at = _in_runs_of_four(ref.shape[1:]) if plan.narrow_states_store else ()
      ref[j, *at] = carry[0].astype(ref.dtype)
    for p in chunk.positions(steps):
      carry = step(p, carry)
    return carry

  h, total = chunk.over_sub_chunks(sub_chunk, (h0, jnp.zeros((plan.block_d,), plan.dtype)), load)
  if "end_state" in out:
    out["end_state"][...] = h
  if "total_delta" in out:
    out["total_delta"][...] = total


def _in_runs_of_four(shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """Indices of a whole (rows, columns) block, (rows, columns % 4 + columns // 4 * 4) with truncating division (jnp's
  floor division hides the runs behind a select): Triton's analysis sees columns contiguous in runs of 4 only."""
  rows, columns = (jax.lax.broadcasted_iota(jnp.int32, shape, axis) for axis in (0, 1))
  return rows, jax.lax.rem(columns, 4) + jax.lax.div(columns, 4) * 4


def _forward_by_channel_kernel(*refs, plan: _Plan, chunk_index, outputs: tuple[str, ...], start: str):
  """`_forward_kernel` for the forward passes (outputs "y", "ungated", "start_state", "end_state",
  "total_delta"; start "zero" or "carried"), with the state held as `plan.state` vectors of the block's
  channels: written so, Triton gives each thread whole channels, B and C are per-position rows that every
  thread reads whole, and the sums over the state are multiply-adds within a thread."""
  args, refs = _split_refs(refs, plan)
  chunk = _Chunk(args, plan, chunk_index)
  n_state, log2e = plan.state, math.log2(math.e)
  A = [chunk.a_of(args.A[:, n]) * log2e for n in range(n_state)]  # log2(e) A: each decay is a multiply and an ex2

  def decay(delta, n):
    return ptx.exp2(delta * A[n], native=plan.native)

  zero = jnp.zeros((plan.block_d,), plan.dtype)
  h0 = [zero] * n_state
  if start == "carried":
    local_ref, total_ref = refs.pop(0), refs.pop(0)

    def load_chunk(j):
      return total_ref[j, :], tuple(local_ref[j, :, n] for n in range(n_state))

    def update(c, loaded):
      total, local = loaded
      return tuple(_fma(chunk, decay(total, n), c[n], local[n]) for n in range(n_state))

    h0 = list(_over_earlier_chunks(chunk, load_chunk, update, tuple(h0), reverse=plan.reverse))
  elif start != "zero":
    raise ValueError(f"the by-channel forward starts from zero or carried states, got {start!r}")
  out = dict(zip(outputs, refs, strict=True))

  def store_state(ref, h):
    for n in range(n_state):
      ref[:, n] = h[n]

  if "start_state" in out:
    store_state(out["start_state"], h0)

  # B's and C's words at a position (a packed word holds two states) are read in (block_d, ROW_VECTOR) blocks of
  # the same ROW_VECTOR words in every row: Triton gives each thread one row, so one 128-bit load per thread
  # replaces ROW_VECTOR scalar ones, and picking a word out of a row (`values`) stays in the thread's registers.
  width = n_state // 2 if plan.packed else n_state
  vector = min(width, ROW_VECTOR)
  column = jax.lax.broadcasted_iota(jnp.int32, (plan.block_d, vector), 1)

  def row(ref, t):  # B's or C's words at t, as loaded (converted where used: `values`)
    return [ref[t, column + k] for k in range(0, width, vector)]

  def values(row):
    # A word is picked by a select and a sum over the row, on its bits: a float sum with zeros is no identity to
    # ptxas (-0.0 + 0.0), which kept 34 adds per position for float32 rows (offline sm_90).
    dtype = row[0].dtype
    bits = [_as_bits(v) for v in row]
    words = [jnp.sum(jnp.where(column == n, v, 0), axis=1, dtype=v.dtype) for v in bits for n in range(vector)]
    if plan.packed:
      return [x for word in words for x in _unpacked_pairs(word)]
    return [jax.lax.bitcast_convert_type(x, dtype).astype(plan.dtype) for x in words]

  def load(j):
    steps = []
    for s in range(plan.sub_chunk):
      t, real = chunk.clamped(j * plan.sub_chunk + s)
      delta = chunk.step_size(t, real)[1]
      u = chunk.load(args.u, t)
      B = row(args.B, t)
      C = row(args.C, t) if "y" in out else None
      z = chunk.load(args.z, t) if plan.gated and "y" in out else None
      extra = chunk.load(args.partner, t) if plan.combine is not None else None
      steps.append((t, u, delta, B, C, z, extra))
    return steps

  def sub_chunk(j, steps, carry):
    h, total = carry
    for t, u, delta, B, C, z, extra in steps:
      B, C = values(B), None if C is None else values(C)
      du = delta * u
      h = [_fma(chunk, decay(delta, n), h[n], du * B[n]) for n in range(n_state)]
      total = total + delta
      if "y" not in out:
        continue
      _write_y(chunk, out, t, ptx.sum_of_products(zip(h, C), chunk.D * u, native=plan.native), extra, z)
    return h, total

  h, total = chunk.over_sub_chunks(sub_chunk, (h0, zero), load)
  if "end_state" in out:
    store_state(out["end_state"], h)
  if "total_delta" in out:
    out["total_delta"][...] = total


def _adjoint_kernel(*refs, plan: _Plan, chunk_index):
  """What one chunk adds to the adjoint carried backwards between chunks: exp(delta A) g at its first
  scan step when zero enters it from later positions."""
  args, (dy_ref, out_ref) = _split_refs(refs, plan)
  chunk = _Chunk(args, plan, chunk_index)

  def step(i, g_next):
    t = chunk.position(chunk.size - 1 - i)
    g = _fma(chunk, chunk.load(dy_ref, t)[:, None], chunk.load(args.C, t)[None, :], g_next)
    return _decay(chunk, chunk.step_size(t)[1]) * g

  out_ref[...] = jax.lax.fori_loop(0, chunk.size, step, jnp.zeros((plan.block_d, plan.state), plan.dtype))


def _grad_kernel(*refs, plan: _Plan, chunk_index, start: str):
  """Gradients of one (sequence, channel block, chunk), walking it backwards from the adjoint that
  enters from later chunks (`_entering`, against the scan); states recomputed per sub-chunk from `states`."""
  args, (dy_ref, states_ref, *refs) = _split_refs(refs, plan)
  chunk = _Chunk(args, plan, chunk_index)
  g_in = _entering(chunk, refs, start, reverse=not plan.reverse, ahead=False)
  du_ref, ddelta_ref, dB_ref, dA_ref, dD_ref, dbias_ref = refs
  A, D = chunk.A, chunk.D

  def load(j):
    return states_ref[j], chunk.sub_chunk(j, C=True, extra=dy_ref)

  def sub_chunk(j, loaded, carry):
    g_next, dA, dD, dbias = carry
    h_start, positions = loaded[0].astype(plan.dtype), chunk.positions(loaded[1])
    hs = [h_start]
    for p in positions:
      hs.append(_step(chunk, hs[-1], p))

    for k in reversed(range(plan.sub_chunk)):
      # The decay is recomputed, not kept from the pass above (the same 255 registers and time in ncu).
      p, decay, h_prev = positions[k], _decay(chunk, positions[k].delta), hs[k]
      t, u, x, delta, B, C = p.t, p.u, p.x, p.delta, p.B, p.C
      dy = jnp.where(p.real, p.extra, 0.0)  # a repeated step adds no output gradient
      g = _fma(chunk, dy[:, None], C[None, :], g_next)
      g_B = jnp.sum(g * B[None, :], axis=1)
      g_decayed = g * decay * h_prev  # dL/d(delta A) of this step
      ddelta = u * g_B + jnp.sum(g_decayed * A, axis=1)
      if plan.softplus:
        ddelta = ddelta * softplus_grad(x, chunk.sigmoid)
      ddelta = jnp.where(p.real, ddelta, 0.0)
      # Steps past the end are walked first, so the real step at the same position rewrites these.
      du_ref[t, :] = (delta * g_B + D * dy).astype(du_ref.dtype)
      ddelta_ref[t, :] = ddelta.astype(ddelta_ref.dtype)
      dB_ref[t, :] = jnp.sum(g * (delta * u)[:, None], axis=0)
      dA, dD, dbias = _fma(chunk, g_decayed, delta[:, None], dA), _fma(chunk, dy, u, dD), dbias + ddelta
      g_next = decay * g
    return g_next, dA, dD, dbias

  vector = jnp.zeros((plan.block_d,), plan.dtype)
  init = (g_in, jnp.zeros_like(A), vector, vector)
  _, dA, dD, dbias = chunk.over_sub_chunks(sub_chunk, init, load, backwards=True)
  dA_ref[...], dD_ref[...], dbias_ref[...] = dA, dD, dbias


class _Specs:
  """Block specs over the grid (batch, channel block, chunk) for every array the kernels touch."""

  def __init__(self, plan: _Plan):
    d, n, c = plan.block_d, plan.state, plan.chunk
    self.seq = pl.BlockSpec((None, c, d), lambda b, i, k: (b, k, i))  # (batch, length, channels)
    self.channel_state = pl.BlockSpec((d, n), lambda b, i, k: (i, 0))  # (channels, state)
    self.channel = pl.BlockSpec((d,), lambda b, i, k: (i,))  # (channels,)
    self.chunk_state = pl.BlockSpec((None, None, d, n), lambda b, i, k: (b, k, i, 0))  # (batch, chunks, ...)
    self.chunk_channel = pl.BlockSpec((None, None, d), lambda b, i, k: (b, k, i))
    self.channel_state_of_seq = pl.BlockSpec((None, d, n), lambda b, i, k: (b, i, 0))  # (batch, channels, state)
    # Every chunk's, for the carry across chunks.
    self.all_chunk_states = pl.BlockSpec((None, plan.num_chunks, d, n), lambda b, i, k: (b, 0, i, 0))
    self.all_chunk_channels = pl.BlockSpec((None, plan.num_chunks, d), lambda b, i, k: (b, 0, i))
    # (batch, chunks x sub-chunks, channels, state), and (batch, length, channel blocks, state): with the blocks
    # beside the state, XLA's sum over them reads each position's partial sums as one contiguous row (a Vim-Ti
    # training step 37.5-37.6 -> 37.1 ms against (batch, blocks, length, state), H200).
    self.sub_chunk_states = pl.BlockSpec((None, plan.sub_chunks, d, n), lambda b, i, k: (b, k, i, 0))
    self.block_seq_state = pl.BlockSpec((None, c, None, n), lambda b, i, k: (b, k, i, 0))
    # u, delta, A, B, C, D, delta_bias[, z][, partner]
    # (batch, length, state), or the state-wide block of columns `plan.columns` names.
    width = n // 2 if plan.packed else n
    B, C = (pl.BlockSpec((None, c, width), lambda b, i, k, j=j or 0: (b, k, j)) for j in plan.columns)
    z = pl.BlockSpec((None, c, d), lambda b, i, k, j=plan.z_column or 0: (b, k, i + j))
    self.args = [self.seq, self.seq, self.channel_state, B, C, self.channel, self.channel]
    self.args += [z] * plan.gated + [self.seq] * (plan.combine is not None)


class _Job(NamedTuple):
  """One scan's share of a kernel launch: its plan, arguments, extra inputs and outputs with their specs."""

  plan: _Plan
  args: tuple
  extra: list
  extra_specs: list
  out_shapes: list
  out_specs: list
  # Outputs written over inputs: (index in args + extra, index in the outputs) pairs (`pallas_call`'s aliases).
  aliases: tuple[tuple[int, int], ...] = ()


def _launch(kernel, jobs: list[_Job], name: str, **options) -> list[list[jax.Array]]:
  """Runs `kernel` over several independent scans of one geometry (Vim's two directions) in one launch,
  their programs stacked along the grid's batch axis; returns each job's outputs.

  Why: the gradient kernel needed 248 registers (218 now), so an H100 held 8 (9) of its one-warp programs per
  SM, 1,056 (1,188) at once; one direction at 224², batch 128 is 1,536 programs, 1.45 (1.29) waves that take as
  long as two. Two directions in one launch are 2.9 (2.6) waves, 3 where two launches take 4: the gradient
  kernels of a Vim-Ti training step went from 23.5 to 19.6 ms (profile_step.py, H100)."""
  grids = {job.plan.grid()[1:] for job in jobs}
  if len(grids) != 1:
    raise ValueError(f"jobs launched together need one channel-block and chunk grid, got {sorted(grids)}")
  starts = [sum(job.plan.batch for job in jobs[:j]) for j in range(len(jobs))]

  def specs(job: _Job, start: int) -> tuple[list, list]:
    ins, outs = [*_Specs(job.plan).args, *job.extra_specs], job.out_specs
    if len(jobs) == 1:
      return ins, outs

    def shifted(spec):  # this job's blocks at its own batch index (clamped where another job runs)
      index = lambda b, i, k: spec.index_map(jnp.clip(b - start, 0, job.plan.batch - 1), i, k)  # noqa: E731
      return pl.BlockSpec(spec.block_shape, index)

    return [shifted(x) for x in ins], [shifted(x) for x in outs]

  in_specs, out_specs = zip(*(specs(job, start) for job, start in zip(jobs, starts)), strict=True)
  in_counts = [len(x) for x in in_specs]
  out_counts = [len(x) for x in out_specs]

  def body(*refs):
    ins, outs = list(refs[: sum(in_counts)]), list(refs[sum(in_counts) :])
    # Program ids are read here, outside `pl.when`: interpret mode cannot evaluate them in a branch.
    b, chunk_index = pl.program_id(0), pl.program_id(2)
    for job, start, n_in, n_out in zip(jobs, starts, in_counts, out_counts, strict=True):
      run = functools.partial(kernel, *ins[:n_in], *outs[:n_out], plan=job.plan, chunk_index=chunk_index, **options)
      ins, outs = ins[n_in:], outs[n_out:]
      if len(jobs) == 1:
        run()
      else:
        pl.when((b >= start) & (b < start + job.plan.batch))(run)

  plan = jobs[0].plan
  in_starts = [sum(len(job.args) + len(job.extra) for job in jobs[:j]) for j in range(len(jobs))]
  out_starts = [sum(out_counts[:j]) for j in range(len(jobs))]
  aliases = {
    i + in_start: o + out_start
    for job, in_start, out_start in zip(jobs, in_starts, out_starts, strict=True)
    for i, o in job.aliases
  }
  flat = pl.pallas_call(
    body,
    grid=(sum(job.plan.batch for job in jobs), *plan.grid()[1:]),
    in_specs=[spec for x in in_specs for spec in x],
    out_specs=[spec for x in out_specs for spec in x],
    out_shape=[shape for job in jobs for shape in job.out_shapes],
    compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=NUM_STAGES),
    interpret=plan.interpret,
    name=name,
    input_output_aliases=aliases,
  )(*(x for job in jobs for x in (*job.args, *job.extra)))
  return [flat[sum(out_counts[:j]) : sum(out_counts[: j + 1])] for j in range(len(jobs))]


def _call(kernel, plan: _Plan, args, extra, extra_specs, out_shapes, out_specs, name: str, aliases=(), **options):
  """`_launch` of one scan."""
  job = _Job(plan, args, extra, extra_specs, out_shapes, out_specs, aliases)
  return _launch(kernel, [job], name, **options)[0]


def _read_in_place(B, C, state: int) -> tuple[int | None, int | None]:
  """`_Plan.columns`: the block of `state` columns that each `Columns` window of B and C is, read in place;
  None for a plain array or a window that is no such block (sliced by `_padded`)."""
  return tuple(x.block(state) if isinstance(x, Columns) else None for x in (B, C))


def _read_z_in_place(z, block_d: int) -> int | None:
  """`_Plan.z_column`: the first block of `block_d` columns of a `Columns` window z, read in place; None for a plain
  array or a window of no whole blocks (sliced by `_padded`)."""
  return z.first_block(block_d) if isinstance(z, Columns) else None


def _padded(plan: _Plan, u, delta, A, B, C, D, bias, z) -> tuple:
  """The arguments with channels and state padded for the kernels (z dropped when absent); B, C and z as
  `plan.columns` and `plan.z_column` read them."""
  u, delta = (pad_to(x, 2, plan.channels) for x in (u, delta))
  if z is not None and plan.z_column is not None:  # whole blocks, no padding
    z = z.array
  elif z is not None:
    z = pad_to(z.value() if isinstance(z, Columns) else z, 2, plan.channels)
  B, C = (
    x.array if column is not None else pad_to(x.value() if isinstance(x, Columns) else x, 2, plan.state)
    for x, column in zip((B, C), plan.columns, strict=True)
  )
  A = pad_to(pad_to(A.log if isinstance(A, NegativeExp) else A, 0, plan.channels), 1, plan.state)
  D, bias = (pad_to(x, 0, plan.channels) for x in (D, bias))
  return (u, delta, A, B, C, D, bias) + ((z,) if plan.gated else ())


def _per_chunk(plan: _Plan, *, state: bool = True) -> jax.ShapeDtypeStruct:
  """(batch, chunks, channels[, state]) in the compute dtype."""
  shape = (plan.batch, plan.num_chunks, plan.channels) + ((plan.state,) if state else ())
  return jax.ShapeDtypeStruct(shape, plan.dtype)


def _packed(plan: _Plan, args: tuple) -> tuple[_Plan, tuple]:
  """(plan, args) with bf16 B and C as `_packed_pairs` where the by-channel forward reads them."""
  B, C = args[3:5]
  pairs = B.shape[-1] % 2 == C.shape[-1] % 2 == plan.state % 2 == 0
  if not (plan.by_channel and pairs and B.dtype == C.dtype == jnp.bfloat16):
    return plan, args
  return dataclasses.replace(plan, packed=True), (*args[:3], _packed_pairs(B), _packed_pairs(C), *args[5:])


def _packed_pairs(x: jax.Array) -> jax.Array:
  """A bf16 array with an even last axis as uint32 words of two neighbours (the first in the low half)."""
  return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)


def _as_bits(x: jax.Array) -> jax.Array:
  """x's bits as the unsigned integer dtype of its width (x itself if it has that dtype)."""
  bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  return x if x.dtype == bits else jax.lax.bitcast_convert_type(x, bits)


def _unpacked_pairs(word: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The two bf16 of a `_packed_pairs` word, as float32: exact, a shift and a mask."""
  low = jax.lax.bitcast_convert_type(word << 16, jnp.float32)
  high = jax.lax.bitcast_convert_type(word & jnp.uint32(0xFFFF0000), jnp.float32)
  return low, high


class _Outputs(NamedTuple):
  """What `_forward` returns: y, the last state, the chunk start states and total steps (None for one chunk),
  and the combined output before the gate (None unless asked for)."""

  y: jax.Array
  last: jax.Array
  start: jax.Array | None
  total: jax.Array | None
  ungated: jax.Array | None


def _forward(
  plan: _Plan, args: tuple, *, ungated: bool = False, states: bool = True, y_over: str | None = None
) -> _Outputs:
  """The forward of the padded `args`; with `ungated`, y before the gate is written too. Without `states` (where
  nothing is differentiated and the last state is not wanted), the output pass writes only y: the last state and a
  chunked forward's start states (each a (batch, chunks, channels, state) float32 array) are then None. `y_over` names
  the argument that y is written over, "delta" or "partner" (the second direction's, `plan.combine`): each is read
  at a position before that position's y is written, by the thread that writes it or across a barrier, and steps
  past a chunk's end re-read its last position in the load of the sub-chunk that holds it or before that is written
  (`over_sub_chunks`). Vim-Ti's inference at 1248², batch 32 on an H200 (ab_inference_memory_vim_tiny_h200.txt):
  no states 36 MiB less and 0.22 ms slower, y over delta 143 MiB and 0.40 ms, y over the partner 54 MiB and 0.51 ms
  (its 143 MiB count once the first pass no longer peaks higher), each against the head without it."""
  plan, args = _packed(plan.forward(), args)
  kernel = _forward_by_channel_kernel if plan.by_channel else _forward_kernel
  specs = _Specs(plan)
  per_chunk = _per_chunk(plan)
  u = args[0]
  seq = jax.ShapeDtypeStruct(u.shape, u.dtype)
  if y_over not in (None, "delta", "partner") or (y_over == "partner" and plan.combine is None):
    raise ValueError(f"y_over must be None, 'delta' or, for a combining plan, 'partner'; got {y_over!r}")
  over = {None: None, "delta": 1, "partner": len(args) - 1}[y_over]
  fits = over is not None and (args[over].shape, args[over].dtype) == (u.shape, u.dtype)
  aliases = ((over, 0),) if fits else ()
  # The ungated output, if asked for, comes last: its shape, spec and name.
  more_shapes, more_specs, more_names = ([seq], [specs.seq], ("ungated",)) if ungated else ([], [], ())
  if plan.num_chunks == 1:
    end_shapes, end_specs, end_names = ([per_chunk], [specs.chunk_state], ("end_state",)) if states else ([], [], ())
    y, *outs = _call(
      kernel, plan, args, [], [], [seq, *end_shapes, *more_shapes], [specs.seq, *end_specs, *more_specs],
      "selective_scan_fwd", outputs=("y", *end_names, *more_names), start="zero", aliases=aliases,
    )  # fmt: skip
    return _Outputs(y, outs[0][:, 0] if states else None, None, None, outs[-1] if ungated else None)
  totals = _per_chunk(plan, state=False)
  local_end, total = _call(
    kernel, plan, args, [], [], [per_chunk, totals], [specs.chunk_state, specs.chunk_channel],
    "selective_scan_chunk_ends", outputs=("end_state", "total_delta"), start="zero",
  )  # fmt: skip
  state_shapes, state_specs, state_names = ([per_chunk] * 2, [specs.chunk_state] * 2, ("start_state", "end_state"))
  if not states:
    state_shapes, state_specs, state_names = [], [], ()
  y, *outs = _call(
    kernel, plan, args, [local_end, total], [specs.all_chunk_states, specs.all_chunk_channels],
    [seq, *state_shapes, *more_shapes], [specs.seq, *state_specs, *more_specs],
    "selective_scan_fwd", outputs=("y", *state_names, *more_names), start="carried", aliases=aliases,
  )  # fmt: skip
  kept = outs[-1] if ungated else None
  if not states:
    return _Outputs(y, None, None, None, kept)
  start, end = outs[:2]
  return _Outputs(y, end[:, 0 if plan.reverse else -1], start, total, kept)


class _Scan(NamedTuple):
  """What the backward of one scan starts from: its plan, padded arguments (u, delta, A, B, C, D, bias[, z]),
  forward residuals (chunk start states and total steps, None for one chunk) and padded cotangents."""

  plan: _Plan
  args: tuple
  start: jax.Array | None
  total: jax.Array | None
  dy: jax.Array
  d_last: jax.Array


def _starts(scan: _Scan, specs: _Specs, local) -> tuple[tuple, tuple]:
  """How the states pass and the gradient kernel start (`_entering`): each (refs, their specs, kind)."""
  if scan.plan.num_chunks == 1:
    return ([], [], "zero"), ([scan.d_last], [specs.channel_state_of_seq], "given")
  carried = [specs.channel_state_of_seq, specs.all_chunk_states, specs.all_chunk_channels]
  return ([scan.start], [specs.chunk_state], "given"), ([scan.d_last, local, scan.total], carried, "carried_from")


def _grad_outputs(scan: _Scan, specs: _Specs) -> tuple[list, list]:
  """The gradient kernel's output shapes and specs: du, ddelta, then dB per position and channel block,
  dA per chunk, dD and dbias per chunk."""
  plan, args = scan.plan, scan.args
  like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args[:2]]  # u, delta
  shapes = [*like, _per_block(plan), _per_chunk(plan), _per_chunk(plan, state=False), _per_chunk(plan, state=False)]
  out_specs = [specs.seq] * len(like) + [specs.block_seq_state, specs.chunk_state] + [specs.chunk_channel] * 2
  return shapes, out_specs


def _per_block(plan: _Plan) -> jax.ShapeDtypeStruct:
  """(batch, length, channel blocks, state) in the compute dtype: dB's and dC's partial sums."""
  return jax.ShapeDtypeStruct((plan.batch, plan.length, plan.channels // plan.block_d, plan.state), plan.dtype)


def _backward(scans: list[_Scan]) -> list[tuple]:
  """Gradients (du, ddelta, dA, dB, dC, dD, dbias) of each ungated scan (the gate's backward is XLA's:
  `gate_backward`); each kernel runs once for all scans (`_launch`)."""
  if any(scan.plan.gated for scan in scans):
    raise ValueError("the kernels' backward runs ungated: take the gate's backward to `gate_backward` first")
  specs = [_Specs(scan.plan) for scan in scans]
  locals_ = [None] * len(scans)
  if scans[0].plan.num_chunks > 1:  # the adjoint each chunk passes on from zero
    jobs = [_Job(x.plan, x.args, [x.dy], [s.seq], [_per_chunk(x.plan)], [s.chunk_state]) for x, s in zip(scans, specs)]
    locals_ = [local for (local,) in _launch(_adjoint_kernel, jobs, "selective_scan_bwd_carry")]
  starts = [_starts(*x) for x in zip(scans, specs, locals_)]

  jobs = []
  for scan, s, ((refs, ref_specs, _), _) in zip(scans, specs, starts):
    plan = scan.plan
    shape = (plan.batch, plan.num_chunks * plan.sub_chunks, plan.channels, plan.state)
    shape = jax.ShapeDtypeStruct(shape, plan.states_dtype)
    extra, extra_specs = [scan.dy, *refs], [s.seq, *ref_specs]
    shapes_and_specs = [shape, _per_block(plan)], [s.sub_chunk_states, s.block_seq_state]
    states_plan = dataclasses.replace(plan, paired=plan.paired or plan.paired_states)
    jobs.append(_Job(states_plan, scan.args, extra, extra_specs, *shapes_and_specs))
  # The states passes also form dC (Σ dy h needs no adjoint), which the gradient kernel, bound by its registers,
  # then skips: offline 248 -> 218 registers and 807 -> 679 loop instructions per 2 positions; a Vim-Ti
  # training step at 224², batch 128 went from 37.5-37.8 to 36.7-37.0 ms
  # (H200, ab_dC_in_states_pass_vim_tiny_h200.json).
  # They run one launch per scan: at 80-128 registers each is one wave already, and the two in one launch made the
  # step slower (H100: 55.3 against 54.4 ms; with dC, H200: 37.4 against 36.7-37.0).
  kind = starts[0][0][2]
  outputs = ("sub_chunk_states", "dC")
  states = [_launch(_forward_kernel, [job], "selective_scan_bwd_states", outputs=outputs, start=kind) for job in jobs]

  jobs = []
  for scan, s, (_, (refs, ref_specs, _)), ((sub_chunk_states, _),) in zip(scans, specs, starts, states):
    extra, extra_specs = [scan.dy, sub_chunk_states, *refs], [s.seq, s.sub_chunk_states, *ref_specs]
    jobs.append(_Job(scan.plan, scan.args, extra, extra_specs, *_grad_outputs(scan, s)))
  capped = scans[0].plan.paired  # `GRAD_MAX_REGISTERS` says why
  name = triton_registers.capped("selective_scan_bwd", GRAD_MAX_REGISTERS if capped else None)
  launched = _launch(_grad_kernel, jobs, name, start=starts[0][1][2])
  grads = []
  for ((_, dC),), (du, ddelta, dB, dA, dD, dbias) in zip(states, launched):
    grads.append(dict(du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dbias=dbias))
  # Every scan's dB and dC partial sums summed over their channel blocks.
  partials = [g[name] for g in grads for name in ("dB", "dC")]
  dtypes = [scan.args[i].dtype for scan in scans for i in (3, 4)]  # B's, C's
  sums = iter(_summed_over_blocks(partials, dtypes, interpret=scans[0].plan.interpret))
  results = []
  for scan, g in zip(scans, grads):
    A, D, bias = scan.args[2], scan.args[5], scan.args[6]
    dA, dD, dbias = (g[name].sum(axis=(0, 1)).astype(y.dtype) for name, y in (("dA", A), ("dD", D), ("dbias", bias)))
    results.append((g["du"], g["ddelta"], dA, next(sums), next(sums), dD, dbias))
  return results


SUM_ROWS = 64  # positions per program of `sum_over_blocks`


def _summed_over_blocks(partials: list[jax.Array], dtypes: list, *, interpret: bool) -> list[jax.Array]:
  """`sum_over_blocks` where the positions fill its programs whole, XLA's sums elsewhere (its precondition)."""
  batch, length = partials[0].shape[:2]
  if batch * length % SUM_ROWS:
    return sums_in_xla(partials, dtypes)
  return sum_over_blocks(partials, dtypes, interpret=interpret)


def sums_in_xla(partials: list[jax.Array], dtypes: list) -> list[jax.Array]:
  """`sum_over_blocks`'s sums as XLA reductions."""
  return [x.sum(axis=2).astype(dtype) for x, dtype in zip(partials, dtypes, strict=True)]


def sum_over_blocks(partials: list[jax.Array], dtypes: list, *, interpret: bool) -> list[jax.Array]:
  """Each (batch, length, channel blocks, state) array of partial sums summed over its blocks, in its own dtype in
  block order, then cast to `dtypes`'s: one launch for all, each program reading `SUM_ROWS` positions of every array.

  XLA ran each sum as its own fusion, which with x_proj's gradient formed around it read the float32 partial sums at
  about 1.1 TB/s (H100, Vim-Ti's training step at 224², batch 128: 48 fusions, 1.64 ms,
  profile_vim_tiny_224_train_forty_first_session_no_command_buffers_h100.json). With this launch the step went from
  32.59 to 32.17 ms, every round faster, the same temporaries (ab_sum_over_blocks_vim_tiny_train_h100.txt).

  batch x length must be a multiple of SUM_ROWS: jax 0.11.2's Triton lowering does not mask the blocks that reach past
  an array's end (jax 0.12 adds the mask), so a last program with fewer rows wrote the rest of its block past its
  output, over the start of the next buffer. On an H100 that made the scan's dA and y wrong and, with the launch
  alone, the next array's first rows (partial_block_probe_h100.txt, forty-sixth session)."""
  if len({x.shape for x in partials}) != 1:
    raise ValueError(f"sum_over_blocks: the partial sums must share one shape, got {[x.shape for x in partials]}")
  batch, length, blocks, state = partials[0].shape
  rows = batch * length
  if rows % SUM_ROWS:
    raise ValueError(
      f"sum_over_blocks: batch x length must be a multiple of SUM_ROWS={SUM_ROWS} (whole programs), got {batch} x "
      f"{length}; use `sums_in_xla` there"
    )
  flat = [x.reshape(rows, blocks, state) for x in partials]

  def kernel(*refs):
    ins, outs = refs[: len(flat)], refs[len(flat) :]
    for x_ref, out_ref in zip(ins, outs):
      total = x_ref[:, 0, :]
      for k in range(1, blocks):
        total += x_ref[:, k, :]
      out_ref[...] = total.astype(out_ref.dtype)

  sums = pl.pallas_call(
    kernel,
    grid=(rows // SUM_ROWS,),
    in_specs=[pl.BlockSpec((SUM_ROWS, blocks, state), lambda i: (i, 0, 0))] * len(flat),
    out_specs=[pl.BlockSpec((SUM_ROWS, state), lambda i: (i, 0))] * len(flat),
    out_shape=[jax.ShapeDtypeStruct((rows, state), dtype) for dtype in dtypes],
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    name="selective_scan_bwd_sum_blocks",
  )(*flat)
  return [x.reshape(batch, length, state) for x in sums]


def _plan(
  u,
  A,
  dtype,
  *,
  gated: bool,
  reverse: bool,
  softplus: bool,
  interpret: bool,
  tuning: dict,
  filling: int,
  B=None,
  C=None,
  z=None,
) -> _Plan:
  """The geometry of one scan; sequences split into chunks if they give fewer than `filling` programs. B, C and z
  (given where they may be `Columns`) set `columns` and `z_column`."""
  batch, length, channels = u.shape
  state = pl.next_power_of_2(A.shape[1])
  sub_chunk = tuning.get("sub_chunk", SUB_CHUNK)
  block_d = min(tuning.get("block_d", BLOCK_D), pl.next_power_of_2(channels))
  # Chunks are whole pairs of the backward's sub-chunks and whole forward sub-chunks (`over_sub_chunks`); the
  # tiles' default (2, paired: 4) divides the by-channel one (4), so the layout, which depends on the chunks, can
  # come after.
  multiple = math.lcm(2 * sub_chunk, tuning.get("forward_sub_chunk", FORWARD_SUB_CHUNK))
  if "max_chunk" in tuning or batch * pl.cdiv(channels, block_d) < filling:
    num_chunks = pl.cdiv(length, pl.cdiv(tuning.get("max_chunk", CHUNK), multiple) * multiple)
  else:
    num_chunks = 1
  programs = batch * pl.cdiv(channels, block_d) * num_chunks
  by_channel = tuning.get("by_channel", programs <= BY_CHANNEL_PROGRAMS)
  forward_sub_chunk = tuning.get("forward_sub_chunk", FORWARD_SUB_CHUNK if by_channel else TILES_FORWARD_SUB_CHUNK)
  states_dtype = jnp.dtype(tuning.get("states_dtype", _states_dtype(u.dtype, dtype)))
  return _Plan(
    batch=batch,
    length=length,
    chunk=pl.cdiv(pl.cdiv(length, num_chunks), multiple) * multiple,
    num_chunks=num_chunks,
    sub_chunk=sub_chunk,
    forward_sub_chunk=forward_sub_chunk,
    block_d=block_d,
    channels=pl.cdiv(channels, block_d) * block_d,
    state=state,
    reverse=reverse,
    softplus=softplus,
    gated=gated,
    dtype=jnp.dtype(dtype),
    num_warps=tuning.get("num_warps", NUM_WARPS),
    interpret=interpret,
    columns=_read_in_place(B, C, state),
    z_column=_read_z_in_place(z, block_d) if gated else None,
    a_log=isinstance(A, NegativeExp),
    by_channel=by_channel,
    paired_states=tuning.get("paired_states", programs <= PAIRED_STATES_PROGRAMS),
    states_dtype=states_dtype,
    narrow_states_store=tuning.get("narrow_states_store", NARROW_STATES_STORE and states_dtype == jnp.bfloat16),
    paired_forward=tuning.get("paired_forward", not by_channel),
  )


def _states_dtype(inputs: jnp.dtype, dtype: jnp.dtype) -> jnp.dtype:
  """The kept states' dtype: bf16 for bf16 inputs, else the compute dtype.

  Why: the states pass writes half of all states and the gradient kernel reads them back, Vim-Ti's largest
  memory traffic (at 224², batch 128, 315 MB each way per scan in float32 against 19 MB per bf16 input).
  Only ddelta (so d(delta_bias)), dA and a one-direction scan's dz see the rounding (through the recomputed
  states), and no more than bf16 inputs and cotangents already move them (results README, twenty-second
  session)."""
  return jnp.dtype(jnp.bfloat16) if inputs == jnp.bfloat16 else jnp.dtype(dtype)


def _with_defaults(args: tuple, dtype) -> tuple:
  """(u, delta, A, B, C, D, delta_bias) with absent D and delta_bias as zeros: the kernels read them."""
  zeros = jnp.zeros((args[0].shape[2],), dtype)
  return (*args[:5], *(zeros if x is None else x for x in args[5:]))


def _cropped(grads: tuple, args: tuple) -> tuple:
  """The gradients (u, delta, A, B, C, D, delta_bias) of `args` (unpadded, as given) without channel and state
  padding; a `Columns` window's as the whole array's, a `NegativeExp`'s as its log's."""
  du, ddelta, dA, dB, dC, dD, dbias = grads
  A = args[2]
  channels, state = A.shape
  dA = dA[:channels, :state]
  by_channel = (du[..., :channels], ddelta[..., :channels], A.cotangent(dA) if isinstance(A, NegativeExp) else dA)
  dB, dC = (dx[..., :state] for dx in (dB, dC))
  dB, dC = (x.cotangent(dx) if isinstance(x, Columns) else dx for x, dx in zip(args[3:5], (dB, dC)))
  return (*by_channel, dB, dC, dD[:channels], dbias[:channels])


def scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  z: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  *,
  delta_softplus: bool = False,
  reverse: bool = False,
  interpret: bool = False,
  **tuning: int | bool | str,
) -> tuple[jax.Array, jax.Array]:
  """The whole selective scan (arguments as in `selective_scan`, already checked) in fused kernels,
  differentiable. Returns (y in u's dtype, last state in the compute dtype). `tuning` may set `block_d`
  (channels per program, a power of two), `num_warps`, `max_chunk` (positions per program at most; by
  default CHUNK if batch x channel blocks < FILLING_PROGRAMS, or FORWARD_FILLING_PROGRAMS without
  gradients, else whole sequences), `sub_chunk` (positions per state the backward keeps; its buffer is
  1/sub_chunk of all states), `states_dtype` (of those states; `_states_dtype`), `narrow_states_store`
  (how the states pass stores them: `NARROW_STATES_STORE`) and `forward_sub_chunk` (positions the forward loads
  ahead: FORWARD_SUB_CHUNK by channel, TILES_FORWARD_SUB_CHUNK as tiles); chunks are rounded up to a multiple of both
  sub-chunks. `by_channel` forces the forward's layout; `paired_forward` and `paired_states` whether the forward
  passes and the backward's states pass load two sub-chunks ahead. Where nothing is differentiated and
  `_one_pass_fits`, `mosaic_gpu`'s one-pass forward runs instead, unless `one_pass` is False."""
  one_pass = tuning.pop("one_pass", True)
  channels, state = A.shape
  dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
  u, delta, A, B, C, D, delta_bias = _with_defaults((u, delta, A, B, C, D, delta_bias), dtype)
  options = dict(reverse=reverse, softplus=delta_softplus, interpret=interpret, tuning=tuning)
  plan, inference = (
    _plan(u, A, dtype, gated=z is not None, filling=n, B=B, C=C, **options)
    for n in (FILLING_PROGRAMS, FORWARD_FILLING_PROGRAMS)
  )
  grads_plan = dataclasses.replace(plan, gated=False)  # the gate's backward is XLA's (`gate_backward`)

  def outputs(plan, arrays, *, ungated: bool = False):
    y, last, start, total, y_ungated = _forward(plan, _padded(plan, *arrays), ungated=ungated)
    return (y[..., :channels], last[:, :channels, :state]), (start, total, y_ungated)

  @jax.custom_vjp
  def run(*arrays):
    u, delta, A, B, C, D, delta_bias, z = arrays
    sequences = (u, delta) + (() if z is None else (z,))
    if one_pass and _one_pass_fits(sequences, (B, C), A, softplus=delta_softplus, interpret=interpret):
      y, last = mosaic_gpu.forward(
        *plain((u, delta, A, B, C, D), windows=False), z, delta_bias,  # B and C read where x_proj wrote them
        reverse=reverse, gated=z is not None, last_state=True,
        chunks=mosaic_gpu.chunks_to_fill(u.shape[0], channels), **mosaic_gpu.SINGLE_OPTIONS,
      )  # fmt: skip
      return y, last.astype(dtype)
    return outputs(inference, arrays)[0]

  def run_fwd(*arrays):
    out, kept = outputs(plan, arrays, ungated=z is not None)  # y before the gate, for `gate_backward`
    return out, (arrays, *kept)

  def run_bwd(residuals, cotangents):
    arrays, start, total, y_ungated = residuals
    dy, d_last = cotangents
    d_last = pad_to(pad_to(d_last, 1, plan.channels), 2, plan.state)
    d_last = d_last.astype(plan.dtype)
    *arrays, z = arrays
    dz = None
    if z is not None:
      dy, dz = gate_backward(dy, y_ungated[..., :channels], z, 1.0)
    scan = _Scan(grads_plan, _padded(grads_plan, *arrays, None), start, total, pad_to(dy, 2, plan.channels), d_last)
    (grads,) = _backward([scan])
    return (*_cropped(grads, arrays), dz)

  run.defvjp(run_fwd, run_bwd)
  return run(u, delta, A, B, C, D, delta_bias, z)


def gate_backward(dy: jax.Array, y_ungated: jax.Array, z: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """For y = y_ungated * silu(z), y_ungated = (y_forward + y_backward) * scale (one direction: its y, scale 1): (the
  cotangent of each direction's y, in dy's dtype; dz), in XLA. The gradient kernels then run ungated: none
  recomputes its y for dz, reads z or writes a dz for XLA to add to the other's. The forward keeps
  y_ungated for this (one more (batch, length, channels) residual). Vim-Ti's training step at 224², batch
  128, H100: median 47.8 -> 45.4 ms, with 443 MiB (10%) more temporary memory (ab_gate_backward_in_xla_h100.json);
  one gated direction: the module docstring.
  The cotangent in float32 (one bf16 rounding fewer) was slower in 7 of 8 rounds (ab_gate_cotangent_dtype_h100.json)."""
  wide = jnp.promote_types(dy.dtype, jnp.float32)
  dy_, y_ungated, z_ = (x.astype(wide) for x in (dy, y_ungated, z))
  dz = dy_ * y_ungated * silu_grad(z_)
  return (dy_ * jax.nn.silu(z_) * scale).astype(dy.dtype), dz.astype(z.dtype)


def _one_pass_fits(sequences: tuple, states: tuple, A, *, softplus: bool, interpret: bool) -> bool:
  """Whether the inference path runs `mosaic_gpu`'s one-pass forward for these (batch, length, channels) sequences
  (all of one shape) and (batch, length, state) B and C rows: all bf16, delta through softplus, where
  `mosaic_gpu.fits`."""
  if interpret or not softplus or any(x.shape != sequences[0].shape for x in sequences):
    return False
  if any(x.dtype != jnp.bfloat16 for x in sequences + states):
    return False
  batch, length, channels = sequences[0].shape
  return mosaic_gpu.fits(batch, length, channels, A.shape[1], jnp.bfloat16, mosaic_gpu.compute_capability())


def _mosaic_backward_fits(plan: _Plan, directions: tuple, dy: jax.Array, *, softplus: bool) -> bool:
  """Whether `mosaic_gpu_backward` can take these directions' gradients: bf16 sequences, softplus, state 16, whole
  blocks of its channels, on Hopper, and sequences enough to fill the GPU without chunks (it has none), which the
  Triton plan's one chunk stands for."""
  sequences = [x for u, delta, *_ in directions for x in (u, delta)] + [dy]
  return (
    plan.num_chunks == 1
    and softplus
    and not plan.interpret
    and all(x.dtype == jnp.bfloat16 for x in sequences)
    and directions[0][2].shape[1] == mosaic_gpu_backward.STATE
    and dy.shape[2] % mosaic_gpu_backward.BLOCK_D == 0
    and mosaic_gpu.compute_capability() == "9.0"
  )


def bidirectional(
  forward: tuple,
  backward: tuple,
  z: jax.Array | Columns | None,
  *,
  delta_softplus: bool = False,
  divide_out: bool = True,
  interpret: bool = False,
  **tuning: int | bool | str,
) -> jax.Array:
  """Vim's two directions and their combine, (y_forward + y_backward) [/ 2] * silu(z), in two kernels:
  the forward direction writes its ungated output, and the backward direction's kernel reads it back,
  adds its own, scales and gates. `forward` and `backward` are (u, delta, A, B, C, D, delta_bias); the
  backward direction runs reverse=True. z may be a `Columns` window (of in_proj's output), which the kernels read in
  place. Where nothing is differentiated and `_one_pass_fits`, the two kernels are
  `mosaic_gpu`'s one-pass forward, unless `tuning` sets `one_pass=False`. Returns y in the forward u's dtype."""
  one_pass = tuning.pop("one_pass", True)
  channels = forward[2].shape[0]
  scale = 0.5 if divide_out else 1.0
  dtype = compute_dtype(*forward, *backward, z)
  forward, backward = _with_defaults(forward, dtype), _with_defaults(backward, dtype)
  options = dict(softplus=delta_softplus, interpret=interpret, tuning=tuning)

  def plans(filling: int) -> tuple[_Plan, _Plan]:
    first, second = (
      _plan(u, A, dtype, gated=gated, reverse=reverse, filling=filling, B=B, C=C, z=z, **options)
      for (u, _, A, B, C, *_), gated, reverse in ((forward, False, False), (backward, z is not None, True))
    )
    return first, dataclasses.replace(second, combine=scale)

  (first, second), inference = plans(FILLING_PROGRAMS), plans(FORWARD_FILLING_PROGRAMS)
  # The backward takes the gate outside the kernels (`gate_backward`), so both directions' gradient kernels
  # run ungated. They go one sub-chunk at a time (`over_sub_chunks`): paired, the two in one launch measured slower
  # (H100, bf16, both directions forward+backward: 1.60 against 1.57 ms at 224², batch 128, 14.6 against 13.9 at
  # 1248², batch 32; 1% faster at 224² stride 8 and 736²), where one direction gains 3-4%; and again with the register
  # cap, in one launch (1.086 ms uncapped, 0.999 capped, against 0.888 unpaired at 224², batch 128; Vim-Ti's training
  # step 33.83 against 31.99 ms) and a launch per direction (0.941-0.949 against 0.920; training step 32.45 against
  # 31.87; H100, fifty-second and fifty-third sessions,
  # ab_paired_bidirectional_grads_{capped,apart}_vim_tiny_train_h100.txt).
  first_grads = dataclasses.replace(first, paired=False)
  second_grads = dataclasses.replace(second, combine=None, gated=False, paired=False)

  def outputs(first, second, forward, backward, z, *, differentiated: bool):
    """y, and what the backward keeps if `differentiated`."""
    ungated = differentiated and z is not None
    # Without a backward (which reads delta), the first direction's y goes over its delta and the second's over the
    # first's: memory for inference, at a cost in time (`_forward`). In a training step the memory is not saved
    # there, so both are written apart.
    partner, _, start_f, total_f, _ = _forward(
      first, _padded(first, *forward, None), states=differentiated, y_over=None if differentiated else "delta"
    )
    y, _, start_b, total_b, y_ungated = _forward(
      second,
      (*_padded(second, *backward, z), partner),
      ungated=ungated,
      states=differentiated,
      y_over=None if differentiated else "partner",
    )
    return y[..., :channels], (y_ungated, start_f, total_f, start_b, total_b)

  @jax.custom_vjp
  def run(forward, backward, z):
    sequences = (forward[0], forward[1], backward[0], backward[1], z)
    combine = z is not None and scale == 0.5  # what `mosaic_gpu.bidirectional` computes
    states = (forward[3], forward[4], backward[3], backward[4])  # B and C
    if (
      one_pass
      and combine
      and _one_pass_fits(sequences, states, forward[2], softplus=delta_softplus, interpret=interpret)
    ):
      chunks = mosaic_gpu.chunks_to_fill(forward[0].shape[0], channels)
      unsliced = functools.partial(plain, windows=False)  # B and C read where x_proj wrote them
      return mosaic_gpu.bidirectional(unsliced(forward), unsliced(backward), z, chunks=chunks, **mosaic_gpu.OPTIONS)
    return outputs(*inference, forward, backward, z, differentiated=False)[0]

  def run_fwd(forward, backward, z):
    y, kept = outputs(first, second, forward, backward, z, differentiated=True)
    return y, (forward, backward, z, *kept)

  def run_bwd(residuals, dy):
    forward, backward, z, y_ungated, start_f, total_f, start_b, total_b = residuals
    dz = None
    if z is None:
      dy = dy * scale
    else:
      dy, dz = gate_backward(dy, y_ungated[..., :channels], z.value() if isinstance(z, Columns) else z, scale)
      dz = z.cotangent(dz) if isinstance(z, Columns) else dz
    if MOSAIC_BACKWARD and _mosaic_backward_fits(first, (forward, backward), dy, softplus=delta_softplus):
      grads = [
        _cropped(mosaic_gpu_backward.gradients(*plain(args), dy, reverse=reverse), args)
        for args, reverse in ((forward, False), (backward, True))
      ]
      return (*grads, dz)
    dy = pad_to(dy, 2, first.channels)
    no_last = jnp.zeros((first.batch, first.channels, first.state), dtype)
    grads_f, grads_b = _backward([
      _Scan(first_grads, _padded(first_grads, *forward, None), start_f, total_f, dy, no_last),
      _Scan(second_grads, _padded(second_grads, *backward, None), start_b, total_b, dy, no_last),
    ])  # fmt: skip
    return _cropped(grads_f, forward), _cropped(grads_b, backward), dz

  run.defvjp(run_fwd, run_bwd)
  return run(forward, backward, z)
