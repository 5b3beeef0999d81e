"""Tests for kernels.selective_scan: official float64 golden data, impl cross-checks, memory, validation.

Pallas kernels run in interpret mode, so on CPU they check the kernel's logic, not its GPU lowering
(that is only compiled for CUDA here, never run)."""

import functools
import math
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import compiled as fast_compiled
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels.selective_scan import (
  Direction,
  pallas_gpu,
  ptx,
  reference,
  selective_scan,
  selective_scan_bidirectional,
  xla,
)

# Every impl that runs here; Pallas kernels run in interpret mode (the other impls ignore `interpret`).
IMPLS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
DATA = pathlib.Path(__file__).parents[1] / "data" / "selective_scan"
ARRAY_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# One table: forward (y, last_state) and gradient tolerances (used as rtol and atol) per input dtype.
# float64 is the golden data, float32 is ~1e-6 off it (README of the data); bfloat16 outputs and
# gradients are the float32 results rounded, so impls may differ by one bfloat16 ulp (2**-8 relative).
TOLERANCES = {
  "float64": {"fwd": 1e-12, "grad": 1e-10},
  "float32": {"fwd": 1e-5, "grad": 1e-4},
  "bfloat16": {"fwd": 2e-2, "grad": 2e-2},
}


def assert_close(actual, expected, dtype, kind):
  tol = TOLERANCES[jnp.dtype(dtype).name][kind]
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


def jit_run(f, *args):
  return fast_compiled(f, *args)(*args)


def forward_and_vjp(arrays, cotangents, **kwargs):
  """(y, last_state) and the VJP for every array argument."""

  def run(arrays, cotangents):
    out, vjp = jax.vjp(lambda a: selective_scan(**a, return_last_state=True, **kwargs), arrays)
    return out, vjp(cotangents)[0]

  return jit_run(run, arrays, cotangents)


def random_inputs(rng, batch, length, channels, state, *, D, z, delta_bias, delta_softplus, dtype):
  """Inputs in the ranges of the official test data (delta' > 0 and A < 0, so the scan is stable)."""
  seq, vec = (batch, length, channels), (channels,)
  arrays = {
    "u": rng.normal(size=seq),
    # softplus makes any delta positive; without it delta must already be a positive step.
    "delta": 0.5 * rng.normal(size=seq) if delta_softplus else rng.uniform(0.02, 0.5, seq),
    "A": -np.exp(np.log(np.arange(1, state + 1)) + 0.3 * rng.normal(size=(channels, state))),
    "B": rng.normal(size=(batch, length, state)),
    "C": rng.normal(size=(batch, length, state)),
    "D": 1 + 0.5 * rng.normal(size=vec) if D else None,
    "z": rng.normal(size=seq) if z else None,
    "delta_bias": None,
  }
  if delta_bias:
    step = rng.uniform(0.02, 0.22, vec)
    arrays["delta_bias"] = np.log(np.expm1(step)) if delta_softplus else step  # inverse softplus
  return {k: jnp.asarray(v, dtype) for k, v in arrays.items() if v is not None}


def random_cotangents(rng, arrays, dtype):
  """For (y, last_state); the state is in the compute dtype, float32 or wider."""
  batch, _, channels = arrays["u"].shape
  state_shape = (batch, channels, arrays["A"].shape[1])
  return (
    jnp.asarray(rng.normal(size=arrays["u"].shape), dtype),
    jnp.asarray(rng.normal(size=state_shape), jnp.promote_types(dtype, jnp.float32)),
  )


# --- Golden data: the official selective_scan_ref in float64 ------------------------------------


def load_case(name):
  """The npz is channel-major, (b, d, l) and (b, n, l); ours is channel-last (b, l, d), (b, l, n)."""
  with np.load(DATA / f"{name}.npz") as npz:
    data = {k: npz[k] for k in npz.files}
  for k, v in data.items():
    if v.ndim == 3 and k != "last_state":
      data[k] = v.transpose(0, 2, 1)
  return data


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["case_z_bias_softplus", "case_noz_nobias_nosoftplus"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_official_reference(impl, case, dtype, x64):
  data = load_case(case)
  arrays = {k: jnp.asarray(data[k], dtype) for k in ARRAY_ARGS if k in data}
  w = jnp.asarray(data["w"], dtype)

  def loss(arrays):
    y, last_state = selective_scan(
      **arrays,
      delta_softplus=bool(data["delta_softplus"]),
      return_last_state=True,
      impl=impl,
      interpret=True,
    )
    return jnp.sum(y * w), (y, last_state)

  (_, (y, last_state)), grads = jit_run(jax.value_and_grad(loss, has_aux=True), arrays)

  chex.assert_trees_all_equal_dtypes((y, last_state), (w, w))
  assert_close((y, last_state), (data["y"], data["last_state"]), dtype, "fwd")
  assert_close(grads, {k: data[f"grad_{k}"] for k in arrays}, dtype, "grad")


# --- Cross-checks against the sequential reference -----------------------------------------------

ALL_OPTIONS = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
NO_OPTIONS = dict(D=False, z=False, delta_bias=False, delta_softplus=False)


@pytest.mark.parametrize(
  "shape, options, dtype",
  [  # shape = (batch, length, channels, state); xla.MAX_CHUNK = 64, pallas_gpu.BLOCK_D = 32
    pytest.param((1, 1, 3, 2), ALL_OPTIONS, jnp.float32, id="l1-all-f32"),
    pytest.param((2, 7, 5, 3), NO_OPTIONS, jnp.bfloat16, id="l7-none-bf16"),
    pytest.param((2, 33, 8, 4), NO_OPTIONS | dict(D=True), jnp.float32, id="l33-D-f32"),
    # 4 chunks of 50, 3 padded positions
    pytest.param((1, 197, 4, 4), ALL_OPTIONS | dict(D=False), jnp.bfloat16, id="l197-noD-bf16"),
    pytest.param((2, 300, 4, 3), ALL_OPTIONS, jnp.float32, id="l300-all-f32"),  # 5 of 60
    pytest.param((1, 301, 3, 2), NO_OPTIONS | dict(delta_bias=True, z=True), jnp.bfloat16, id="l301-z-bias-bf16"),
    # Channel blocks: 2 blocks of 32 with 24 padded channels, and 1 block with 8 padded.
    pytest.param((2, 33, 40, 16), ALL_OPTIONS, jnp.float32, id="l33-d40-n16-all-f32"),
    pytest.param((1, 7, 24, 4), ALL_OPTIONS, jnp.bfloat16, id="l7-d24-n4-all-bf16"),
  ],
)
@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_matches_reference(impl, shape, options, dtype):
  rng = np.random.default_rng(sum(shape))
  arrays = random_inputs(rng, *shape, **options, dtype=dtype)
  cotangents = random_cotangents(rng, arrays, dtype)
  softplus = options["delta_softplus"]

  (y, last_state), grads = forward_and_vjp(arrays, cotangents, delta_softplus=softplus, impl=impl, interpret=True)
  expected = forward_and_vjp(arrays, cotangents, delta_softplus=softplus, impl="reference")

  chex.assert_shape(y, arrays["u"].shape)
  chex.assert_shape(last_state, (shape[0], shape[2], shape[3]))
  chex.assert_trees_all_equal_dtypes((y, last_state, grads), (arrays["u"], cotangents[1], arrays))
  assert_close((y, last_state), expected[0], dtype, "fwd")
  assert_close(grads, expected[1], dtype, "grad")


def _vim_tiny_scan_for_h100(fn, batch: int, length: int) -> tuple[str, set[str]]:
  """(HLO text, names of the Triton kernels) of fn(arrays) lowered for an H100 on any host, at Vim-Ti's
  channels and state with bf16 I/O and all options; an abstract device stands in for the GPU."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  seq, vec = jax.ShapeDtypeStruct((batch, length, 384), jnp.bfloat16), jax.ShapeDtypeStruct((384,), jnp.float32)
  bc = jax.ShapeDtypeStruct((batch, length, 16), jnp.bfloat16)
  arrays = dict(
    u=seq, delta=seq, A=jax.ShapeDtypeStruct((384, 16), jnp.float32), B=bc, C=bc, D=vec, z=seq, delta_bias=vec
  )
  h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    hlo = jax.jit(fn).trace(arrays).lower(lowering_platforms=("cuda",)).as_text()
  return hlo, set(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*name = \"(\w+)\"", hlo))


_GRADIENT_KERNELS = {
  "selective_scan_fwd",
  "selective_scan_bwd_states",
  "selective_scan_bwd",
  "selective_scan_bwd_sum_blocks",
}


def _gradient_kernels(batch: int, length: int, *, capped: bool) -> set[str]:
  """The Triton kernels a differentiated scan runs: the chunk passes where sequences are split, the sums over channel
  blocks where batch x length fills their programs whole (`pallas_gpu._summed_over_blocks`); the gradient kernel
  named for its register cap where it runs pairs of sub-chunks (`pallas_gpu.GRAD_MAX_REGISTERS`)."""
  names = set(_GRADIENT_KERNELS)
  if capped:
    names = names - {"selective_scan_bwd"} | {f"selective_scan_bwd_maxnreg{pallas_gpu.GRAD_MAX_REGISTERS}"}
  if length > pallas_gpu.CHUNK:
    names |= {"selective_scan_chunk_ends", "selective_scan_bwd_carry"}
  if batch * length % pallas_gpu.SUM_ROWS:
    names.discard("selective_scan_bwd_sum_blocks")
  return names


def _scan_with_gradients(arrays):
  (y, last_state), vjp = jax.vjp(lambda a: pallas_gpu.scan(**a, delta_softplus=True, reverse=True), arrays)
  return vjp((y, last_state))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("batch, length", [(128, 197), (8, 6085)], ids=["224-b128", "1248-b8"])
def test_pallas_gpu_lowers_for_cuda(batch, length):
  """Every Triton kernel, forward and backward, at Vim-Ti shapes lowered for an H100: interpret mode never
  runs this path."""
  hlo, names = _vim_tiny_scan_for_h100(_scan_with_gradients, batch, length)
  # Gated, as ungated: the gate's backward is XLA's (`gate_backward`), so the paired gradient kernel is capped.
  assert names == _gradient_kernels(batch, length, capped=True)
  assert hlo.count("ttg.maxnreg") == 1
  # The forward by channel (few programs, `BY_CHANNEL_PROGRAMS`) reads B and C as uint32 pairs of bf16.
  assert (f"tensor<{batch}x{length}x8xui32>" in hlo) == (length <= pallas_gpu.CHUNK)
  # The kernels read the bf16 arrays themselves: no float32 copy of u is made.
  assert f"tensor<{batch}x{length}x384xbf16>, tensor<{batch}x{length}x384xbf16>, tensor<384x16xf32>" in hlo
  # The states the backward keeps (one per sub-chunk) are bf16 like its inputs (`_states_dtype`).
  kept = {
    t for n, t in re.findall(rf"tensor<{batch}x(\d+)x384x16x(\w+)>", hlo) if int(n) >= length // pallas_gpu.SUB_CHUNK
  }
  assert kept == {"bf16"}
  # No kernel reads or writes a float32 (batch, length, channels) array (XLA's gate backward converts in its fusion).
  kernel_calls = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton\(.*", hlo)
  assert not any(f"tensor<{batch}x{length}x384xf32>" in call for call in kernel_calls)
  # exp, sigmoid and multiply-adds as single PTX instructions (`ptx`), not libdevice's exact forms.
  assert all(op in hlo for op in ("ex2.approx.ftz.f32", "rcp.approx.ftz.f32", "fma.rn.f32", "lg2.approx.ftz.f32"))
  assert "__nv_exp" not in hlo and "__nv_log1p" not in hlo


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_ungated_gradient_kernel_is_capped_for_cuda():
  """Without z, too, the gradient kernel that pairs sub-chunks is named for its cap, and the cap reaches its Triton
  module as Triton's own attribute (`triton_registers`)."""
  hlo, names = _vim_tiny_scan_for_h100(lambda a: _scan_with_gradients(a | {"z": None}), 128, 197)
  assert names == _gradient_kernels(128, 197, capped=True)
  assert hlo.count("ttg.maxnreg") == 1


def test_ptx_log1p_pieces_are_float32_accurate():
  """The kernels' log1p (series below 1/8, log2 above) in float32 against float64, with an exact log2: within
  6e-7 relative over 0 <= y <= 1e9, the rounding of 1 + y just above 1/8 (the hardware's lg2 adds at most 1.5e-6
  there)."""
  y = np.concatenate([[0.0], np.logspace(-30, 9, 4001), np.linspace(0.1, 0.15, 1001)]).astype(np.float32)
  got = ptx._log1p_pieces(jnp.asarray(y), jnp.log2, lambda a, b, c: a * b + c)
  assert got.dtype == jnp.float32
  want = np.log1p(y.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=6e-7, atol=0)


def test_ptx_forms_take_float32_only():
  """The PTX forms are float32 instructions: anything else is refused by name, not miscompiled."""
  with pytest.raises(TypeError, match="fma.rn.f32.*float32.*bfloat16"):
    ptx.fma(*[jnp.ones((2,), jnp.bfloat16)] * 3, native=True)


def _bidirectional_with_gradients(arrays):
  """Vim's fused bidirectional call as the model trains it: both directions from the same arrays."""
  direction = tuple(arrays[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias"))
  y, vjp = jax.vjp(
    lambda forward, backward: pallas_gpu.bidirectional(forward, backward, arrays["z"], delta_softplus=True),
    direction,
    direction,
  )
  return vjp(y)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("batch, length", [(128, 197), (8, 6085)], ids=["224-b128", "1248-b8"])
def test_pallas_gpu_bidirectional_lowers_for_cuda(batch, length):
  """The fused bidirectional path's kernels (the second direction's forward writing its ungated output too,
  both directions' ungated gradient kernels in one launch) lowered for an H100."""
  hlo, names = _vim_tiny_scan_for_h100(_bidirectional_with_gradients, batch, length)
  assert names == _gradient_kernels(batch, length, capped=False)
  assert "ttg.maxnreg" not in hlo  # one sub-chunk at a time it takes no cap
  assert len(re.findall(r'name = "selective_scan_bwd"', hlo)) == 1  # both directions in one launch
  # Their dB and dC too, where the positions fill the sums' programs whole.
  assert len(re.findall(r'name = "selective_scan_bwd_sum_blocks"', hlo)) == (batch * length % pallas_gpu.SUM_ROWS == 0)


@pytest.mark.parametrize(
  "batch, length, chunks, by_channel", [(128, 197, 1, True), (32, 6085, 24, False), (256, 197, 1, False)]
)
def test_pallas_gpu_program_count_sets_the_layout_and_the_pairing(batch, length, chunks, by_channel):
  """The forward passes hold the state by channel when a pass has at most `BY_CHANNEL_PROGRAMS` programs (Vim-Ti
  at 224², batch 128: 1,536), else as (channels, state) tiles (1248², batch 32: 24 chunks of 384 sequences), which
  load fewer positions ahead, in pairs of sub-chunks; a tuning overrides that without moving the chunk boundaries.
  The backward's states pass pairs its sub-chunks (loads further ahead) where programs are few
  (`PAIRED_STATES_PROGRAMS`)."""
  u, A = jnp.zeros((batch, length, 384), jnp.bfloat16), jnp.zeros((384, 16))
  options = dict(
    gated=True, reverse=False, softplus=True, interpret=False, tuning={}, filling=pallas_gpu.FILLING_PROGRAMS
  )
  plan = pallas_gpu._plan(u, A, jnp.float32, **options)
  ahead = pallas_gpu.FORWARD_SUB_CHUNK if by_channel else pallas_gpu.TILES_FORWARD_SUB_CHUNK
  assert (plan.num_chunks, plan.by_channel, plan.forward_sub_chunk) == (chunks, by_channel, ahead)
  assert plan.paired_states == by_channel
  assert plan.forward().paired == (not by_channel)
  tuned = pallas_gpu._plan(u, A, jnp.float32, **{**options, "tuning": {"forward_sub_chunk": 4}})
  assert (tuned.forward_sub_chunk, tuned.chunk, tuned.num_chunks) == (4, plan.chunk, plan.num_chunks)


@pytest.mark.parametrize(
  "inputs, compute, tuning, kept",
  [("bfloat16", "float32", {}, "bfloat16"), ("float32", "float32", {}, "float32"),
   ("float64", "float64", {}, "float64"), ("bfloat16", "float32", {"states_dtype": "float32"}, "float32")],
)  # fmt: skip
def test_pallas_gpu_backward_keeps_states_in_the_inputs_precision(inputs, compute, tuning, kept, x64):
  """The states pass writes the states for the gradient kernel in bf16 when the inputs are bf16 (half the
  backward's largest traffic), else in the compute dtype; the `states_dtype` tuning overrides it."""
  u, A = jnp.zeros((2, 197, 384), inputs), jnp.zeros((384, 16), compute)
  options = dict(gated=True, reverse=False, softplus=True, interpret=True, filling=pallas_gpu.FILLING_PROGRAMS)
  assert pallas_gpu._plan(u, A, jnp.dtype(compute), tuning=tuning, **options).states_dtype == jnp.dtype(kept)


def test_bf16_kept_states_change_bf16_gradients_by_at_most_an_output_rounding():
  """Keeping bf16 inputs' states in bf16 moves only ddelta, dA and d(delta_bias) (through h), and by less
  than the bf16 rounding of the gradients themselves: within 2**-8 of each one's largest magnitude (the
  same states kept as float8 e4m3 move dA by 2**-5.8)."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(3), (2, 37, 24, 16), jnp.bfloat16)
  dy = jnp.asarray(np.random.default_rng(4).normal(size=z.shape), jnp.bfloat16)

  def gradients(states_dtype):
    fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, interpret=True, states_dtype=states_dtype)
    d_forward, d_backward, dz = jit_run(lambda *a: jax.vjp(fused, *a)[1](dy), forward, backward, z)
    return [dict(zip(Direction._fields, d, strict=True)) for d in (d_forward, d_backward)] + [{"z": dz}]

  for kept_bf16, kept_f32 in zip(gradients("bfloat16"), gradients("float32"), strict=True):
    for name, want in kept_f32.items():
      got, want = np.asarray(kept_bf16[name], np.float32), np.asarray(want, np.float32)
      tolerance = 2**-8 * np.abs(want).max() if name in ("delta", "A", "delta_bias") else 0
      np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=name)


def test_narrow_states_store_keeps_every_gradient():
  """`narrow_states_store` only changes how Triton sees the states pass's store (runs of 4 states): the kept states,
  and so every gradient, are the same."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(5), (2, 37, 24, 16), jnp.bfloat16)
  dy = jnp.asarray(np.random.default_rng(6).normal(size=z.shape), jnp.bfloat16)

  def gradients(narrow):
    fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, interpret=True, narrow_states_store=narrow)
    return jit_run(lambda *a: jax.vjp(fused, *a)[1](dy), forward, backward, z)

  chex.assert_trees_all_equal(gradients(True), gradients(False))
  indices = pallas_gpu._in_runs_of_four((3, 16))
  chex.assert_trees_all_equal(jnp.stack(indices), jnp.indices((3, 16)))


def test_packed_pairs_unpack_to_the_exact_bf16_values():
  """The by-channel forward's uint32 words of two bf16 give back each value exactly as float32, signs, zeros,
  subnormals, infinities and NaN included, in order."""
  special = [0.0, -0.0, 1e-40, -1e-40, np.inf, -np.inf, np.nan, 3.0e38, -1.5, 2.0**-133]
  rng = np.random.default_rng(0)
  values = jnp.asarray(np.concatenate([special, rng.normal(size=54) * 10.0 ** rng.integers(-30, 30, 54)]), jnp.bfloat16)
  pairs = values.reshape(2, 16, 2)
  low, high = pallas_gpu._unpacked_pairs(pallas_gpu._packed_pairs(pairs.reshape(2, 32)))
  chex.assert_trees_all_equal((low, high), (pairs[..., 0].astype(jnp.float32), pairs[..., 1].astype(jnp.float32)))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_pallas_gpu_inference_splits_sequences_later_than_training():
  """Vim-Ti at 736², batch 64 gives 768 programs of whole sequences: enough for a forward alone, which
  then runs in one pass; with gradients the sequences are split into chunks (2 forward passes)."""
  inference = lambda arrays: pallas_gpu.scan(**arrays, delta_softplus=True)  # noqa: E731
  assert _vim_tiny_scan_for_h100(inference, 64, 2117)[1] == {"selective_scan_fwd"}
  assert "selective_scan_chunk_ends" in _vim_tiny_scan_for_h100(_scan_with_gradients, 64, 2117)[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_reverse_is_flip_scan_flip(impl):
  """reverse=True equals the reference run on inputs flipped along length, output flipped back."""
  rng = np.random.default_rng(7)
  arrays = random_inputs(rng, 2, 197, 4, 3, **ALL_OPTIONS, dtype=jnp.float32)
  ct_y, ct_state = random_cotangents(rng, arrays, jnp.float32)

  def flip(tree):  # every (batch, length, ...) array; A, D, delta_bias and the state have no length
    return {k: v[:, ::-1] if v.ndim == 3 else v for k, v in tree.items()}

  (y, last_state), grads = forward_and_vjp(
    arrays, (ct_y, ct_state), delta_softplus=True, reverse=True, impl=impl, interpret=True
  )
  (y_flip, state_flip), grads_flip = forward_and_vjp(
    flip(arrays), (ct_y[:, ::-1], ct_state), delta_softplus=True, impl="reference"
  )
  assert_close((y, last_state), (y_flip[:, ::-1], state_flip), jnp.float32, "fwd")
  assert_close(grads, flip(grads_flip), jnp.float32, "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_softplus_matches_torch_and_has_finite_gradients(impl, x64):
  """torch softplus: log1p(exp(x)) up to 20, identity above; large inputs must not give inf/nan
  gradients through the unused branch."""
  bias = 0.5
  x = np.array([-1e4, -30.0, -1.0, 0.0, 1.0, 19.9, 20.0, 20.1, 50.0, 1e4])  # delta + bias
  channels = x.size
  ones = jnp.ones((1, 2, channels))
  arrays = {
    "u": ones,
    "delta": jnp.asarray(np.broadcast_to(x - bias, (1, 2, channels))),
    "A": -jnp.ones((channels, 1)),
    "B": jnp.ones((1, 2, 1)),
    "C": jnp.ones((1, 2, 1)),
    "D": jnp.full((channels,), 0.25),
    "z": ones,
    "delta_bias": jnp.full((channels,), bias),
  }

  def first_output(arrays):  # at t = 0, h = delta' * B * u, so y = (delta' + D) * silu(z)
    return selective_scan(**arrays, delta_softplus=True, impl=impl, interpret=True)[0, 0]

  expected = np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))
  chex.assert_trees_all_close(jit_run(first_output, arrays), (expected + 0.25) * jax.nn.silu(1.0), rtol=1e-14)
  grads = jit_run(jax.grad(lambda a: jnp.sum(first_output(a))), arrays)
  chex.assert_tree_all_finite(grads)
  sigmoid = np.where(x > 20, 1.0, np.exp(-np.logaddexp(0, -x)))
  chex.assert_trees_all_close(grads["delta"][0, 0], sigmoid * jax.nn.silu(1.0), rtol=1e-14)


@pytest.mark.parametrize("within_chunk", ["associative", "sequential"])
@pytest.mark.parametrize("max_chunk", [1, 8, 32])
def test_xla_chunking_matches_reference_in_float64(max_chunk, within_chunk, x64):
  """Chunk boundaries and padding at float64 precision, both directions, with either scan inside the chunks (the
  accelerators' and the CPU's): on length 33, chunks of 1 (33 chunks), 8 (5 chunks of 7, 2 padded) and 32 (2 chunks
  of 17, 1 padded)."""
  rng = np.random.default_rng(max_chunk)
  inputs = random_inputs(rng, 2, 33, 3, 2, **NO_OPTIONS, dtype=jnp.float64)
  cotangents = [random_cotangents(rng, inputs, jnp.float64) for _ in range(2)]

  def both_directions(scan):
    def run(inputs, cotangents):
      out, vjp = jax.vjp(lambda a: [scan(**a, reverse=r) for r in (False, True)], inputs)
      return out, vjp(cotangents)[0]

    return jit_run(run, inputs, cotangents)

  out, grads = both_directions(functools.partial(xla.scan, max_chunk=max_chunk, within_chunk=within_chunk))
  expected_out, expected_grads = both_directions(reference.scan)
  assert_close(out, expected_out, jnp.float64, "fwd")
  assert_close(grads, expected_grads, jnp.float64, "grad")


@pytest.mark.parametrize("by_channel", [True, False], ids=["by-channel", "tiles"])
@pytest.mark.parametrize("max_chunk, sub_chunk, forward_sub_chunk", [(1, 1, 1), (8, 4, 2), (32, 4, 8), (6, 2, 4)])
def test_pallas_gpu_chunking_matches_reference_in_float64(max_chunk, sub_chunk, forward_sub_chunk, by_channel, x64):
  """The kernels' chunk passes, the carries between chunks (state forwards, adjoint backwards) and
  partial sub-chunks, both directions, all options: on length 33, chunks of 1 (rounded up to a pair of
  the backward's sub-chunks, 2: 17 chunks, the last of one position), 8 (5 chunks, the last short), 32
  (2 chunks of 32 and 1) and 6 (rounded up to 8, whole pairs of sub-chunks of 2 and sub-chunks of 4); the
  forward passes in either layout."""
  rng = np.random.default_rng(max_chunk)
  inputs = random_inputs(rng, 2, 33, 3, 2, **ALL_OPTIONS, dtype=jnp.float64)
  cotangents = random_cotangents(rng, inputs, jnp.float64)
  options = dict(
    max_chunk=max_chunk, sub_chunk=sub_chunk, forward_sub_chunk=forward_sub_chunk, by_channel=by_channel,
    interpret=True, delta_softplus=True,
  )  # fmt: skip
  for reverse in (False, True):

    def run(scan, inputs, cotangents, reverse=reverse):
      out, vjp = jax.vjp(lambda a: scan(**a, reverse=reverse), inputs)
      return out, vjp(cotangents)[0]

    kernel = functools.partial(pallas_gpu.scan, **options)
    expected = functools.partial(selective_scan, impl="reference", delta_softplus=True, return_last_state=True)
    out, grads = jit_run(functools.partial(run, kernel), inputs, cotangents)
    expected_out, expected_grads = jit_run(functools.partial(run, expected), inputs, cotangents)
    assert_close(out, expected_out, jnp.float64, "fwd")
    assert_close(grads, expected_grads, jnp.float64, "grad")


@pytest.mark.parametrize("tuning", [{}, dict(max_chunk=8, sub_chunk=4)], ids=["one-chunk", "five-chunks"])
def test_pallas_gpu_gate_backward_in_xla_matches_reference_in_float64(tuning, monkeypatch, x64):
  """A gated scan's backward takes dz and the gate's cotangent from the output before the gate that its forward keeps
  (`gate_backward`), and its kernels run ungated: y, the last state and every gradient equal the reference's, both
  directions, whole sequences and chunks."""
  plans, backward = [], pallas_gpu._backward
  monkeypatch.setattr(pallas_gpu, "_backward", lambda scans: plans.extend(s.plan for s in scans) or backward(scans))
  rng = np.random.default_rng(5)
  inputs = random_inputs(rng, 2, 33, 3, 2, **ALL_OPTIONS, dtype=jnp.float64)
  cotangents = random_cotangents(rng, inputs, jnp.float64)
  for reverse in (False, True):

    def run(scan, inputs, cotangents, reverse=reverse):
      out, vjp = jax.vjp(lambda a: scan(**a, reverse=reverse, delta_softplus=True), inputs)
      return out, vjp(cotangents)[0]

    kernel = functools.partial(pallas_gpu.scan, interpret=True, **tuning)
    expected = functools.partial(selective_scan, impl="reference", return_last_state=True)
    out, grads = jit_run(functools.partial(run, kernel), inputs, cotangents)
    expected_out, expected_grads = jit_run(functools.partial(run, expected), inputs, cotangents)
    assert_close(out, expected_out, jnp.float64, "fwd")
    assert_close(grads, expected_grads, jnp.float64, "grad")
  assert plans and not any(plan.gated for plan in plans)


def test_pallas_gpu_backward_walks_pairs_of_sub_chunks_and_the_forward_single_ones():
  """The backward's kernels walk pairs of sub-chunks (`_Chunk.over_sub_chunks`), so a chunk holds whole
  pairs of them (an odd count in the last chunk gets one past the end); the forward passes by channel walk one at
  a time and need whole forward sub-chunks only."""
  u, A = jax.ShapeDtypeStruct((1, 1000, 64), jnp.float32), jax.ShapeDtypeStruct((64, 16), jnp.float32)
  tuning = {"sub_chunk": 4, "forward_sub_chunk": 2, "max_chunk": 100}
  options = dict(gated=True, reverse=False, softplus=True, interpret=True, tuning=tuning, filling=0)
  plan = pallas_gpu._plan(u, A, jnp.float32, **options)
  assert plan.paired and not plan.forward().paired
  assert (plan.chunk, plan.num_chunks) == (104, 10)  # 100 rounded up to whole pairs of 4


def test_pallas_gpu_fused_bidirectional_backward_kernels_run_ungated_one_sub_chunk_at_a_time(monkeypatch):
  """The gate's backward runs in XLA from the ungated output the forward keeps, so neither direction's
  gradient kernel reads z. Paired, both directions' gradient kernels in one launch measured slower than one
  sub-chunk at a time (where one direction's backward gains), so the fused bidirectional backward does not pair."""
  plans, backward = [], pallas_gpu._backward
  monkeypatch.setattr(pallas_gpu, "_backward", lambda scans: plans.extend(s.plan for s in scans) or backward(scans))
  forward, reverse, z = bidirectional_inputs(np.random.default_rng(0), (1, 9, 8, 4), jnp.float32)

  def loss(forward):
    return pallas_gpu.bidirectional(forward, tuple(reverse), z, delta_softplus=True, interpret=True).sum()

  jax.make_jaxpr(jax.grad(loss))(tuple(forward))
  assert [(plan.paired, plan.gated, plan.combine) for plan in plans] == [(False, False, None)] * 2


@pytest.mark.parametrize(
  "batch, filling, chunks, chunk",
  [(24, pallas_gpu.FILLING_PROGRAMS, 5, 208), (32, pallas_gpu.FILLING_PROGRAMS, 1, 1028),
   (16, pallas_gpu.FORWARD_FILLING_PROGRAMS, 5, 208), (24, pallas_gpu.FORWARD_FILLING_PROGRAMS, 1, 1028)],
)  # fmt: skip
def test_pallas_gpu_splits_sequences_only_when_programs_are_scarce(batch, filling, chunks, chunk):
  """Chunks cost a second pass: with gradients, 1,024 programs of whole sequences (32 x 32 channel blocks)
  are enough to fill the GPU, 768 are not, and then a 1,025-long sequence splits into chunks of at most
  CHUNK (256); a forward alone is faster whole from 768 programs on. Chunks are whole sub-chunks (4
  positions). An explicit `max_chunk` always splits."""
  u, A = jax.ShapeDtypeStruct((batch, 1025, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 16), jnp.float32)
  options = dict(gated=True, reverse=False, softplus=True, interpret=True, tuning={}, filling=filling)
  plan = pallas_gpu._plan(u, A, jnp.float32, **options)
  assert (plan.num_chunks, plan.chunk) == (chunks, chunk)
  assert pallas_gpu._plan(u, A, jnp.float32, **{**options, "tuning": {"max_chunk": 256}}).num_chunks == 5


# --- Bidirectional and mesh --------------------------------------------------------------------


def bidirectional_inputs(rng, shape, dtype):
  """(forward Direction, backward Direction, z) with all options."""
  forward, backward = (random_inputs(rng, *shape, **ALL_OPTIONS, dtype=dtype) for _ in range(2))
  z = forward.pop("z")
  backward.pop("z")
  return Direction(**forward), Direction(**backward), z


def two_scans(forward, backward, z, *, divide_out, impl="reference"):
  """The unfused definition: two gated scans, one reversed, and the combine."""
  return selective_scan_bidirectional(forward, backward, z, delta_softplus=True, divide_out=divide_out, impl=impl)


@pytest.mark.parametrize(
  "shape, dtype, tuning",
  [
    pytest.param((2, 37, 40, 4), jnp.float32, {}, id="one-chunk-f32"),
    pytest.param((2, 37, 8, 4), jnp.float32, dict(max_chunk=16, sub_chunk=4), id="three-chunks-f32"),
    pytest.param((1, 20, 24, 16), jnp.bfloat16, dict(max_chunk=8, sub_chunk=4), id="three-chunks-bf16"),
    pytest.param(  # as where programs are many
      (1, 20, 24, 16), jnp.bfloat16, dict(max_chunk=8, sub_chunk=4, by_channel=False, paired_states=False), id="tiles"
    ),
    pytest.param(
      (1, 20, 24, 16),
      jnp.bfloat16,
      dict(max_chunk=8, sub_chunk=4, by_channel=False, paired_forward=False),
      id="tiles-forward-unpaired",
    ),
  ],
)
@pytest.mark.parametrize("divide_out", [True, False])
def test_fused_bidirectional_matches_two_scans(shape, dtype, tuning, divide_out):
  """The GPU kernels' fused bidirectional path (combine in the second kernel) against two reference scans,
  forward and the gradients of all 15 arrays."""
  rng = np.random.default_rng(sum(shape) + divide_out)
  forward, backward, z = bidirectional_inputs(rng, shape, dtype)
  dy = jnp.asarray(rng.normal(size=z.shape), dtype)
  fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, divide_out=divide_out, interpret=True)

  def run(fn, *args):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(dy)

  got = jit_run(lambda *a: run(lambda *b: fused(*b, **tuning), *a), forward, backward, z)
  want = jit_run(lambda *a: run(functools.partial(two_scans, divide_out=divide_out), *a), forward, backward, z)
  inference = jit_run(lambda *a: fused(*a, **tuning), forward, backward, z)  # no states kept, y written over inputs
  chex.assert_trees_all_equal_dtypes(got, want)
  assert_close(got[0], want[0], dtype, "fwd")
  assert_close(inference, want[0], dtype, "fwd")
  assert_close(got[1], want[1], dtype, "grad")


@pytest.mark.parametrize("tuning", [{}, dict(max_chunk=8, sub_chunk=4)], ids=["one-chunk", "three-chunks"])
def test_fused_bidirectional_inference_writes_y_over_its_inputs(tuning):
  """Without a backward, the first direction's output pass writes y over its delta and the second's over the
  first's y, and the output passes write no states (memory: `pallas_gpu._forward`); with one, every output is
  written apart and the states are written."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(0), (1, 20, 24, 16), jnp.bfloat16)
  fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, interpret=True, **tuning)

  def eqns(jaxpr):  # every equation, those of sub-jaxprs (jit, custom_vjp) included
    for eqn in jaxpr.eqns:
      yield eqn
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's
          if hasattr(sub, "eqns"):
            yield from eqns(sub)

  def output_passes(fn):
    jaxpr = jax.make_jaxpr(fn)(forward, backward, z).jaxpr
    passes = [e for e in eqns(jaxpr) if e.primitive.name == "pallas_call" and e.params["name"] == "selective_scan_fwd"]
    return [(dict(e.params["input_output_aliases"]), len(e.outvars)) for e in passes]

  delta, partner = 1, 8  # the passes' argument order: u, delta, A, B, C, D, delta_bias, [z,] partner
  assert output_passes(fused) == [({delta: 0}, 1), ({partner: 0}, 1)]
  states = 2 if tuning else 1  # the start and end states of each chunk; the end state of one chunk
  trained = output_passes(lambda *a: jax.vjp(fused, *a)[0])
  assert trained == [({}, 1 + states), ({}, 1 + states + 1)]  # the second also writes the ungated y


@pytest.mark.parametrize(
  "tuning",
  [{}, dict(max_chunk=16, sub_chunk=4), dict(max_chunk=16, sub_chunk=4, paired_states=False)],
  ids=["one-chunk", "three-chunks", "three-chunks-states-unpaired"],
)
def test_fused_bidirectional_gradients_match_two_scans_in_float64(tuning, x64):
  """The fused path's backward (the z gate's gradient in XLA from the kept ungated output, ungated gradient
  kernels for both directions) against two reference scans, all 15 gradients, in float64."""
  rng = np.random.default_rng(11)
  forward, backward, z = bidirectional_inputs(rng, (2, 37, 8, 4), jnp.float64)
  dy = jnp.asarray(rng.normal(size=z.shape))

  def grads(fn):
    return jax.vjp(fn, forward, backward, z)[1](dy)

  fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, interpret=True, **tuning)
  got = jit_run(lambda: grads(fused))
  want = jit_run(lambda: grads(functools.partial(two_scans, divide_out=True)))
  assert_close(got, want, jnp.float64, "grad")


def test_fused_bidirectional_backward_launches_each_gradient_kernel_once():
  """Both directions' gradient kernels share one launch (fills 3 waves of an H100 where two take 4); the
  states passes stay one launch per direction, as measured faster."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(3), (2, 32, 8, 4), jnp.float32)

  def loss(forward, backward):
    return jnp.sum(pallas_gpu.bidirectional(forward, backward, z, delta_softplus=True, interpret=True))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(forward, backward)
  names = re.findall(r"name=(selective_scan\w*)", str(jaxpr))
  assert sorted(names) == sorted(
    ["selective_scan_fwd"] * 2
    + ["selective_scan_bwd_states"] * 2
    + ["selective_scan_bwd", "selective_scan_bwd_sum_blocks"]
  )


@pytest.mark.parametrize("batch, length, blocks", [(2, 32, 3), (1, 64, 1), (3, 64, 12)])
def test_sum_over_blocks_equals_numpy(batch, length, blocks, x64):
  """dB's and dC's partial sums over channel blocks (interpret mode): several programs, a single block, Vim-Ti's 12;
  float64 sums cast to float32 and bf16, each array to its own dtype."""
  rng = np.random.default_rng(blocks)
  partials = [jnp.asarray(rng.standard_normal((batch, length, blocks, 16))) for _ in range(2)]
  dtypes = [jnp.float32, jnp.bfloat16]
  got = pallas_gpu.sum_over_blocks(partials, dtypes, interpret=True)
  assert partials[0].dtype == jnp.float64
  for x, dtype, sums in zip(partials, dtypes, got):
    assert sums.shape == (batch, length, 16) and sums.dtype == dtype
    want = np.asarray(x).sum(axis=2).astype(dtype)
    np.testing.assert_array_equal(np.asarray(sums, np.float64), np.asarray(want, np.float64))
  with pytest.raises(ValueError, match="share one shape"):
    pallas_gpu.sum_over_blocks([partials[0], partials[1][:, :3]], dtypes, interpret=True)


def test_sum_over_blocks_refuses_a_partial_last_program():
  """jax 0.11.2's Triton lowering would let that program write past its output (`sum_over_blocks`)."""
  partials = [jnp.zeros((2, 37, 3, 16))] * 2
  with pytest.raises(ValueError, match=r"batch x length must be a multiple of SUM_ROWS=64 .* got 2 x 37"):
    pallas_gpu.sum_over_blocks(partials, [jnp.float32] * 2, interpret=True)


def _under_the_tpu_interpreter(monkeypatch):
  """InterpretParams for Pallas's TPU interpreter, with every `pallas_call` given a parallel grid: the interpreter
  raises on a read or write outside a block or buffer and on two programs touching the same memory, and fills fresh
  memory with NaN, where interpret mode clamps indices and runs programs in order."""
  original = pallas_gpu.pl.pallas_call

  def pallas_call(kernel, *args, grid=(), compiler_params=None, **kwargs):
    del compiler_params  # the Triton ones; the interpreter takes the TPU's
    parallel = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
    return original(kernel, *args, grid=grid, compiler_params=parallel, **kwargs)

  monkeypatch.setattr(pallas_gpu.pl, "pallas_call", pallas_call)
  return pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan")


def test_tiles_kernels_stay_in_bounds_without_races(monkeypatch):
  """The chunked forward as tiles, the adjoint carry, the states pass, the gradient kernel and the dB/dC sums (in the
  backward, and alone over three programs) under the TPU interpreter (`_under_the_tpu_interpreter`) give interpret
  mode's values: no access outside a block, no race between programs. The by-channel forward's row loads are advanced
  indexing, which that interpreter lacks."""
  rng = np.random.default_rng(11)
  arrays = random_inputs(rng, 1, 128, 64, 16, **ALL_OPTIONS, dtype=jnp.float32)
  cotangents = random_cotangents(rng, arrays, jnp.float32)
  partials = [jnp.asarray(rng.standard_normal((1, 192, 12, 16)), jnp.float32) for _ in range(2)]

  def run(interpret):
    scan = functools.partial(pallas_gpu.scan, delta_softplus=True, interpret=interpret, max_chunk=48, by_channel=False)
    outputs, vjp = jax.vjp(lambda a: scan(**a), arrays)
    sums = pallas_gpu.sum_over_blocks(partials, [jnp.float32] * 2, interpret=interpret)
    return outputs, vjp(cotangents), sums

  want = run(True)
  chex.assert_trees_all_close(run(_under_the_tpu_interpreter(monkeypatch)), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length, launched", [(32, True), (37, False)])
def test_sums_over_blocks_launch_only_for_whole_programs(length, launched):
  """The backward sums dB's and dC's partials in `sum_over_blocks` where batch x length fills its programs whole and
  in XLA otherwise (a partial last program wrote past its output on an H100, `sum_over_blocks`); both give the
  gradients of two plain scans."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(4), (2, length, 8, 4), jnp.float32)
  assert (2 * length % pallas_gpu.SUM_ROWS == 0) == launched

  def grads(fn):
    return jax.grad(lambda f, b: jnp.sum(fn(f, b, z) * z), argnums=(0, 1))(forward, backward)

  fused = functools.partial(pallas_gpu.bidirectional, delta_softplus=True, interpret=True)
  names = re.findall(r"name=(selective_scan\w*)", str(jax.make_jaxpr(lambda: grads(fused))()))
  assert ("selective_scan_bwd_sum_blocks" in names) == launched
  assert_close(
    jit_run(lambda: grads(fused)),
    jit_run(lambda: grads(functools.partial(two_scans, divide_out=True))),
    jnp.float32,
    "grad",
  )


def test_bidirectional_public_function_with_each_impl_equals_two_scans():
  forward, backward, z = bidirectional_inputs(np.random.default_rng(5), (2, 33, 8, 4), jnp.float32)
  want = jit_run(functools.partial(two_scans, divide_out=True), forward, backward, z)
  for impl in ("xla", "pallas_gpu"):
    scan = functools.partial(selective_scan_bidirectional, delta_softplus=True, impl=impl, interpret=True)
    assert_close(jit_run(scan, forward, backward, z), want, jnp.float32, "fwd")


def test_bidirectional_names_the_bad_direction():
  forward, backward, z = bidirectional_inputs(np.random.default_rng(6), (2, 9, 8, 4), jnp.float32)
  with pytest.raises(ValueError, match=re.escape("`backward.B` must have shape (batch, length, state) = (2, 9, 4)")):
    selective_scan_bidirectional(forward, backward._replace(B=backward.B[:, :-1]), z)


# --- Columns: B and C as windows of one array (x_proj's output) --------------------------------------


def b_and_c(whole: jax.Array, starts: tuple[int, int], windows: bool, state: int = 4) -> dict:
  """B and C at `starts` of `whole`: its `Columns` windows, or slices."""
  return {k: kernels.Columns(whole, s, state) if windows else whole[..., s : s + state] for k, s in zip("BC", starts)}


# Windows that are whole state-wide blocks (read in place by the GPU kernels) and windows that are not (sliced).
WINDOWS = [pytest.param((8, 12), 16, id="blocks"), pytest.param((5, 10), 15, id="unaligned")]


@pytest.mark.parametrize("starts, width", WINDOWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_columns_windows_equal_sliced_arrays(impl, starts, width):
  """B and C given as windows of one array: y, the last state and the whole array's gradient (the windows'
  gradients in place, zero elsewhere) equal those of B and C sliced out of it, for every impl."""
  rng = np.random.default_rng(sum(starts))
  arrays = random_inputs(rng, 2, 9, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)
  whole = jnp.asarray(rng.normal(size=(2, 9, width)), jnp.float32)

  def loss(whole, windows: bool):
    args = {**arrays, **b_and_c(whole, starts, windows)}
    y, last = selective_scan(**args, delta_softplus=True, return_last_state=True, impl=impl, interpret=True)
    return jnp.sum(jnp.sin(y)) + jnp.sum(last**2)

  got = jit_run(jax.value_and_grad(functools.partial(loss, windows=True)), whole)
  want = jit_run(jax.value_and_grad(functools.partial(loss, windows=False)), whole)
  assert_close(got, want, jnp.float32, "grad")
  outside = np.ones(width, bool)
  outside[starts[0] : starts[0] + 4] = outside[starts[1] : starts[1] + 4] = False
  assert np.all(np.asarray(got[1])[..., outside] == 0)


@pytest.mark.parametrize(
  "starts, width, dtype",
  [
    *(pytest.param(*w.values, jnp.float32, id=w.id) for w in WINDOWS),
    pytest.param((8, 12), 16, jnp.bfloat16, id="blocks-bf16"),
  ],
)
def test_fused_bidirectional_with_columns_windows_equals_sliced_arrays(starts, width, dtype):
  """The fused GPU path with both directions' B and C windows of one array each: y and the arrays' gradients
  equal those with sliced B and C (in bf16, the by-channel forward reads the whole array as uint32 pairs)."""
  rng = np.random.default_rng(7)
  forward, backward, z = bidirectional_inputs(rng, (2, 37, 8, 4), dtype)
  wholes = [jnp.asarray(rng.normal(size=(2, 37, width)), dtype) for _ in range(2)]

  def loss(wholes, windows: bool):
    def direction(d, whole):
      return d._replace(**b_and_c(whole, starts, windows))

    y = pallas_gpu.bidirectional(direction(forward, wholes[0]), direction(backward, wholes[1]), z,
                                 delta_softplus=True, interpret=True)  # fmt: skip
    return jnp.sum(jnp.sin(y))

  got = jit_run(jax.value_and_grad(functools.partial(loss, windows=True)), wholes)
  want = jit_run(jax.value_and_grad(functools.partial(loss, windows=False)), wholes)
  assert_close(got, want, dtype, "grad")


@pytest.mark.parametrize("starts, width, sliced", [((8, 12), 16, False), ((5, 10), 15, True)])
def test_pallas_gpu_reads_block_windows_in_place(starts, width, sliced):
  """A window that is a whole state-wide block reaches the kernel unsliced (its block index selects it);
  any other is sliced first."""
  rng = np.random.default_rng(2)
  arrays = random_inputs(rng, 2, 9, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)
  windowed = {**arrays, **b_and_c(jnp.zeros((2, 9, width)), starts, windows=True)}
  jaxpr = jax.make_jaxpr(lambda a: selective_scan(**a, delta_softplus=True, impl="pallas_gpu", interpret=True))(
    windowed
  )
  assert bool(re.findall(r"\bslice\[", str(jaxpr))) == sliced
  plan = pallas_gpu._plan(arrays["u"], arrays["A"], jnp.float32, gated=True, reverse=False, softplus=True,
                          interpret=True, tuning={}, filling=1, B=windowed["B"], C=windowed["C"])  # fmt: skip
  assert plan.columns == ((None, None) if sliced else (2, 3))


@pytest.mark.parametrize("start, width, in_place", [(8, 24, True), (16, 24, True), (3, 13, False)])
def test_fused_bidirectional_with_a_gate_window_equals_a_sliced_gate(start, width, in_place, x64):
  """z as a window of in_proj's output (x and z side by side): read in place by the kernels where it is whole blocks of
  their channels (8 of 24 from 8 or 16, blocks of 8), sliced otherwise; y and the wide array's gradient (zero outside
  the window) equal those of the sliced z, for pallas_gpu (differentiated and not) and for an impl that slices it
  (reference)."""
  rng = np.random.default_rng(start)
  forward, backward, _ = bidirectional_inputs(rng, (2, 21, 8, 4), jnp.float64)
  wide = jnp.asarray(rng.normal(size=(2, 21, width)))

  def loss(wide, window, impl):
    z = window(wide)
    y = selective_scan_bidirectional(forward, backward, z, delta_softplus=True, impl=impl, interpret=True)
    return jnp.sum(jnp.sin(y))

  windowed, sliced = lambda w: kernels.Columns(w, start, 8), lambda w: w[..., start : start + 8]  # noqa: E731
  want = jit_run(jax.value_and_grad(functools.partial(loss, window=sliced, impl="reference")), wide)
  for impl in ("pallas_gpu", "reference"):
    got = jit_run(jax.value_and_grad(functools.partial(loss, window=windowed, impl=impl)), wide)
    assert_close(got, want, jnp.float64, "grad")
  # Undifferentiated, pallas_gpu runs its inference kernels, which read z too.
  assert_close(jit_run(functools.partial(loss, window=windowed, impl="pallas_gpu"), wide), want[0], jnp.float64, "grad")
  plan = pallas_gpu._plan(forward.u, forward.A, jnp.float64, gated=True, reverse=True, softplus=True, interpret=True,
                          tuning={"block_d": 8}, filling=1, z=windowed(wide))  # fmt: skip
  assert plan.z_column == (start // 8 if in_place else None)


def test_bad_columns_windows_are_named():
  whole = jnp.zeros((2, 33, 12))
  with pytest.raises(ValueError, match=r"Columns: start=10, size=4 must lie within the array's last axis of 12"):
    kernels.Columns(whole, 10, 4)
  args = {**valid_args(), "B": kernels.Columns(whole, 0, 3)}
  message = "`B` must have shape (batch, length, state) = (2, 33, 4), got (2, 33, 3)"
  with pytest.raises(ValueError, match=re.escape(message)):
    selective_scan(**args)


# --- NegativeExp: A as Mamba's A_log, exponentiated by the scan -------------------------------------


def a_log_of(A) -> jax.Array:
  return jnp.log(-jnp.asarray(A))


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_exp_equals_computed_a(impl):
  """A given as `NegativeExp(A_log)`: y, the last state and A_log's gradient equal those of A = -exp(A_log)
  computed in XLA, for every impl (the GPU kernel computes A itself, over several chunks here)."""
  arrays = random_inputs(np.random.default_rng(11), 2, 37, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)
  A_log = a_log_of(arrays.pop("A"))
  if impl == "pallas_gpu":  # three chunks: the kernels that carry states between them compute A too
    scan = functools.partial(pallas_gpu.scan, interpret=True, max_chunk=16, sub_chunk=4)
  else:
    scan = functools.partial(selective_scan, impl=impl, interpret=True, return_last_state=True)

  def loss(A_log, lazy: bool):
    y, last = scan(**arrays, A=kernels.NegativeExp(A_log) if lazy else -jnp.exp(A_log), delta_softplus=True)
    return jnp.sum(jnp.sin(y)) + jnp.sum(last**2)

  got = jit_run(jax.value_and_grad(functools.partial(loss, lazy=True)), A_log)
  want = jit_run(jax.value_and_grad(functools.partial(loss, lazy=False)), A_log)
  assert_close(got, want, jnp.float32, "grad")
  assert np.all(np.asarray(got[1]) != 0)


def test_fused_bidirectional_with_negative_exp_equals_computed_a():
  """The fused GPU path with both directions' A as `NegativeExp`: y and both A_logs' gradients as with A
  computed in XLA; the kernel's jaxpr has no exp of A outside the Pallas calls."""
  forward, backward, z = bidirectional_inputs(np.random.default_rng(12), (2, 37, 8, 4), jnp.float32)
  A_logs = [a_log_of(d.A) for d in (forward, backward)]

  def loss(A_logs, lazy: bool):
    f, b = (d._replace(A=kernels.NegativeExp(a) if lazy else -jnp.exp(a)) for d, a in zip((forward, backward), A_logs))
    return jnp.sum(jnp.sin(pallas_gpu.bidirectional(f, b, z, delta_softplus=True, interpret=True)))

  got = jit_run(jax.value_and_grad(functools.partial(loss, lazy=True)), A_logs)
  want = jit_run(jax.value_and_grad(functools.partial(loss, lazy=False)), A_logs)
  assert_close(got, want, jnp.float32, "grad")
  assert "exp" not in primitives_outside_kernels(jax.make_jaxpr(functools.partial(loss, lazy=True))(A_logs).jaxpr)


def primitives_outside_kernels(jaxpr) -> set[str]:
  """The primitives of `jaxpr` and its sub-jaxprs (custom VJPs, jits), not looking into Pallas calls."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name != "pallas_call":
      for value in eqn.params.values():
        sub = getattr(value, "jaxpr", value)
        if hasattr(sub, "eqns"):
          names |= primitives_outside_kernels(sub)
  return names


def test_negative_exp_runs_per_device_under_a_mesh():
  """A as `NegativeExp` under a mesh with channels split: its log splits like A, and value and A_log's gradient
  equal the unsharded reference's."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  arrays = random_inputs(np.random.default_rng(13), 8, 9, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)
  A_log = a_log_of(arrays.pop("A"))

  def loss(A_log, impl, **kwargs):
    y = selective_scan(**arrays, A=kernels.NegativeExp(A_log), delta_softplus=True, impl=impl, interpret=True,
                       **kwargs)  # fmt: skip
    return jnp.sum(jnp.sin(y))

  expected = jit_run(jax.value_and_grad(functools.partial(loss, impl="reference")), A_log)
  with jax.set_mesh(mesh):
    got = jit_run(jax.value_and_grad(functools.partial(loss, impl="pallas_gpu", channel_axes="model")), A_log)
  assert_close(got, expected, jnp.float32, "grad")


# (mesh shape, axis names, channel_axes, axis type): the batch alone over all 8 devices, or channels over
# "model" (Explicit once per split: it only adds a reshard to the specs).
MESHES = [
  pytest.param((4, 2), ("data", "fsdp"), (), "Auto", id="batch-Auto"),
  pytest.param((4, 2), ("data", "fsdp"), (), "Explicit", id="batch-Explicit"),
  pytest.param((4, 2), ("data", "model"), "model", "Auto", id="channels-over-2-Auto"),
  pytest.param((4, 2), ("data", "model"), "model", "Explicit", id="channels-over-2-Explicit"),
  pytest.param((2, 4), ("data", "model"), ("model",), "Auto", id="channels-over-4-Auto"),
]


def shard_map_output_shapes(fn, *args) -> list[list[tuple[int, ...]]]:
  """The per-device output shapes of each `shard_map` in fn's jaxpr: they show how it was split."""
  eqns = jax.make_jaxpr(fn)(*args).eqns
  return [[v.aval.shape for v in e.params["jaxpr"].outvars] for e in eqns if e.primitive.name == "shard_map"]


def channel_shards(mesh, channel_axes) -> int:
  return math.prod(mesh.shape[a] for a in ((channel_axes,) if isinstance(channel_axes, str) else channel_axes))


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("mesh_shape, axis_names, channel_axes, axis_type", MESHES)
def test_kernels_run_per_device_under_a_mesh(impl, mesh_shape, axis_names, channel_axes, axis_type):
  """A Pallas call cannot be split by XLA's partitioner: under a mesh the kernels run in `shard_map`,
  channels over `channel_axes` and the batch over the other axes, and give the unsharded results: values
  and all gradients. Those of B and C, whole on every channel shard, are sums over the channel shards."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh(mesh_shape, axis_names, axis_types=(kind, kind))
  batch, length, channels, state = 8, 9, 8, 4
  arrays = random_inputs(np.random.default_rng(8), batch, length, channels, state, **ALL_OPTIONS, dtype=jnp.float32)

  def loss(arrays, impl, **kwargs):
    y, last = selective_scan(**arrays, delta_softplus=True, return_last_state=True, impl=impl, interpret=True, **kwargs)
    return jnp.sum(jnp.sin(y)) + jnp.sum(last**2)

  expected = jit_run(jax.value_and_grad(functools.partial(loss, impl="reference")), arrays)
  with jax.set_mesh(mesh):
    sharded = functools.partial(loss, impl=impl, channel_axes=channel_axes)
    c = channel_shards(mesh, channel_axes)
    local_batch, local_channels = batch * c // mesh.size, channels // c
    local = [(local_batch, length, local_channels), (local_batch, local_channels, state)]
    assert shard_map_output_shapes(sharded, arrays) == [local]
    got = jit_run(jax.value_and_grad(sharded), arrays)
  assert_close(got, expected, jnp.float32, "grad")


@pytest.mark.parametrize("channel_axes", [(), "model"])
def test_columns_windows_run_per_device_under_a_mesh(channel_axes):
  """B and C as windows of one array under a mesh (the model's training on GPUs): the window's array splits
  over the batch like B and C, and value and the array's gradient equal the unsharded reference's."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(4)
  arrays = random_inputs(rng, 8, 9, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)
  whole = jnp.asarray(rng.normal(size=(8, 9, 16)), jnp.float32)

  def loss(whole, impl, **kwargs):
    args = {**arrays, **b_and_c(whole, (8, 12), windows=True)}
    return jnp.sum(jnp.sin(selective_scan(**args, delta_softplus=True, impl=impl, interpret=True, **kwargs)))

  expected = jit_run(jax.value_and_grad(functools.partial(loss, impl="reference")), whole)
  with jax.set_mesh(mesh):
    got = jit_run(jax.value_and_grad(functools.partial(loss, impl="pallas_gpu", channel_axes=channel_axes)), whole)
  assert_close(got, expected, jnp.float32, "grad")


@pytest.mark.parametrize(
  "impl, axis_type", [("pallas_gpu", "Auto"), ("pallas_gpu", "Explicit"), ("pallas_tpu", "Auto")]
)
def test_bidirectional_kernels_split_channels_under_a_mesh(impl, axis_type):
  """As above for the bidirectional scan (fused on GPU, two scans on TPU): value and all 15 gradients."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
  inputs = bidirectional_inputs(np.random.default_rng(9), (8, 9, 8, 4), jnp.float32)

  def loss(inputs, impl, **kwargs):
    y = selective_scan_bidirectional(*inputs, delta_softplus=True, impl=impl, interpret=True, **kwargs)
    return jnp.sum(jnp.sin(y))

  expected = jit_run(jax.value_and_grad(functools.partial(loss, impl="reference")), inputs)
  with jax.set_mesh(mesh):
    sharded = functools.partial(loss, impl=impl, channel_axes="model")
    y, last = (2, 9, 4), (2, 4, 4)
    assert shard_map_output_shapes(sharded, inputs) == ([[y]] if impl == "pallas_gpu" else [[y, last]] * 2)
    got = jit_run(jax.value_and_grad(sharded), inputs)
  assert_close(got, expected, jnp.float32, "grad")


def test_default_impl_on_cpu_is_xla_and_returns_only_y():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice")
  arrays = random_inputs(np.random.default_rng(3), 2, 7, 3, 2, **ALL_OPTIONS, dtype=jnp.float32)

  def trace(impl):
    return jax.make_jaxpr(lambda a: selective_scan(**a, delta_softplus=True, impl=impl))(arrays)

  assert str(trace(None)) == str(trace("xla"))
  chex.assert_shape(trace(None).out_avals, [arrays["u"].shape])


# --- Memory -------------------------------------------------------------------------------------


def temp_bytes(impl, batch, length, channels, state):
  """XLA's scratch memory for forward + backward (all array inputs), compiled, never run."""
  shapes = {
    "u": (batch, length, channels),
    "delta": (batch, length, channels),
    "A": (channels, state),
    "B": (batch, length, state),
    "C": (batch, length, state),
  }
  arrays = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

  def fwd_bwd(arrays):
    y, vjp = jax.vjp(lambda a: selective_scan(**a, impl=impl), arrays)
    return vjp(y)

  compiled = fast_compiled(fwd_bwd, arrays)
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("within_chunk", ["associative", "sequential"])
def test_xla_memory_does_not_grow_with_the_full_state(within_chunk, monkeypatch):
  """Doubling the length may add only per-position inputs and per-chunk states, not a
  (batch, length, channels, state) tensor, with either scan inside the chunks. Comparing two lengths cancels the
  fixed per-chunk scratch; the reference, which keeps every step's state, shows the metric sees such tensors."""
  monkeypatch.setitem(xla.WITHIN_CHUNK, jax.default_backend(), within_chunk)
  batch, channels, state, length = 1, 64, 64, 1024
  full_state_growth = batch * length * channels * state * 4
  growth = {
    impl: temp_bytes(impl, batch, 2 * length, channels, state) - temp_bytes(impl, batch, length, channels, state)
    for impl in ("reference", "xla")
  }
  assert growth["reference"] >= full_state_growth, growth
  assert growth["xla"] < full_state_growth / 8, growth


# --- Validation ---------------------------------------------------------------------------------


def valid_args():
  rng = np.random.default_rng(0)
  return random_inputs(rng, 2, 33, 8, 4, **ALL_OPTIONS, dtype=jnp.float32)


@pytest.mark.parametrize(
  "name, bad, error",
  [
    pytest.param("u", lambda x: x[0], ValueError, id="u-ndim"),
    pytest.param("u", lambda x: x[:, :0], ValueError, id="u-empty"),
    pytest.param("u", lambda x: x.astype(jnp.int32), TypeError, id="u-int"),
    pytest.param("delta", lambda x: x[:, :-1], ValueError, id="delta-length"),
    pytest.param("A", lambda x: x[:-1], ValueError, id="A-channels"),
    pytest.param("A", lambda x: x[0], ValueError, id="A-ndim"),
    pytest.param("A", lambda x: x.astype(jnp.complex64), TypeError, id="A-complex"),
    pytest.param("B", lambda x: x[..., :-1], ValueError, id="B-state"),
    pytest.param("C", lambda x: x[:1], ValueError, id="C-batch"),
    pytest.param("D", lambda x: x[:, None], ValueError, id="D-ndim"),
    pytest.param("z", lambda x: x[:, :-1], ValueError, id="z-length"),
    pytest.param("delta_bias", lambda x: x[:-1], ValueError, id="delta_bias-channels"),
    pytest.param("delta_bias", lambda x: x.astype(jnp.int32), TypeError, id="delta_bias-int"),
  ],
)
def test_bad_argument_is_named(name, bad, error):
  args = valid_args()
  args[name] = bad(args[name])
  with pytest.raises(error, match=f"`{name}`"):
    selective_scan(**args)


def test_shape_error_gives_expected_and_actual_shape():
  args = valid_args()
  args["B"] = args["B"].transpose(0, 2, 1)
  message = "selective_scan: `B` must have shape (batch, length, state) = (2, 33, 4), got (2, 4, 33)"
  with pytest.raises(ValueError, match=re.escape(message)):
    selective_scan(**args)


def test_xla_names_a_bad_within_chunk():
  args = {k: v for k, v in valid_args().items() if k in ("u", "delta", "A", "B", "C")}
  with pytest.raises(ValueError, match="within_chunk must be 'associative' or 'sequential', got 'parallel'"):
    xla.scan(**args, reverse=False, within_chunk="parallel")


def test_unknown_impl_lists_valid_impls():
  with pytest.raises(ValueError, match=r"unknown impl 'cuda'.*'reference', 'xla'"):
    selective_scan(**valid_args(), impl="cuda")


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize(
  "channels, channel_axes, message",
  [
    pytest.param(8, "tensor", "`channel_axes` must be distinct axes of the mesh ('data', 'model'), got ('tensor',)",
                 id="unknown-axis"),
    pytest.param(8, ("model", "model"), "`channel_axes` must be distinct axes", id="repeated-axis"),
    pytest.param(6, "data", "`channel_axes` ('data',) split the channels 4 ways, so the channel count must be"
                 " divisible by 4, got 6", id="indivisible"),
  ],
)  # fmt: skip
def test_bad_channel_axes_are_named_whatever_the_impl(impl, channels, channel_axes, message):
  args = random_inputs(np.random.default_rng(0), 4, 5, channels, 4, **ALL_OPTIONS, dtype=jnp.float32)
  with jax.set_mesh(jax.make_mesh((4, 2), ("data", "model"))):
    with pytest.raises(ValueError, match=re.escape(message)):
      selective_scan(**args, delta_softplus=True, impl=impl, interpret=True, channel_axes=channel_axes)
    forward = Direction(**{k: v for k, v in args.items() if k != "z"})
    with pytest.raises(ValueError, match=re.escape(message)):
      selective_scan_bidirectional(forward, forward, args["z"], impl=impl, interpret=True, channel_axes=channel_axes)


def test_channel_axes_without_a_mesh_is_an_error():
  with pytest.raises(ValueError, match=re.escape("`channel_axes` must be () without a mesh")):
    selective_scan(**valid_args(), channel_axes="model")


def test_pallas_on_cpu_is_pallas_gpu_in_interpret_mode_only():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice")
  args = valid_args()

  def trace(impl):
    return jax.make_jaxpr(lambda a: selective_scan(**a, impl=impl, interpret=True))(args)

  assert str(trace("pallas")) == str(trace("pallas_gpu"))
  with pytest.raises(NotImplementedError, match="impl='pallas' on backend 'cpu'"):
    selective_scan(**args, impl="pallas")


def test_kernels_is_this_projects_package():
  """Another PyPI package installs a top-level `kernels`; ours must win."""
  project = pathlib.Path(__file__).resolve().parents[2]
  assert pathlib.Path(kernels.__file__).resolve() == project / "kernels" / "__init__.py"
