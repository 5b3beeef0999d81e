"""The Vim model against the official one: logits, every layer's activations, init, options, errors."""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import chex
import fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import numpy_vim
import pytest
from fast_compile import logits_of, tokens_of
from flax import nnx

from kernels import Columns, add_norm, selective_scan
from kernels.selective_scan import pallas_gpu
from vim_jax.models import convert, create_model, layers, model_config, vim
from vim_jax.models.vim import Block, ModelConfig, PatchEmbed, VisionMamba

# Released parameter counts at 1000 classes (vim_spec.md §3).
OFFICIAL_PARAM_COUNTS = {
  "vim_tiny": 7_148_008,
  "vim_small": 25_796_584,
  "vim_base": 97_598_440,
  "vim_tiny_stride8": 7_250_344,
  "vim_small_stride8": 26_001_256,
}


def assert_rel_close(actual, expected, rtol: float, name: str = "") -> None:
  """max |actual − expected| <= rtol · max |expected| (relative to the tensor's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"


def ref_model(vim_ref, **overrides) -> VisionMamba:
  cfg, _ = convert.infer_config(vim_ref["state_dict"], img_size=64, **overrides)
  return convert.from_official_state_dict(vim_ref["state_dict"], cfg)


def parameter_gradients(model: nnx.Module, loss) -> nnx.State:
  """The gradient of loss(model) for every parameter (`fast_compile`)."""
  graphdef, state = nnx.split(model)
  return fast_compile.compiled(jax.grad(lambda state: loss(nnx.merge(graphdef, state))), state)(state)


def param_count(model: nnx.Module) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_parameter_counts_equal_official(name):
  model = nnx.eval_shape(lambda: create_model(name))
  assert param_count(model) == OFFICIAL_PARAM_COUNTS[name]


def test_sequence_layout_of_variants():
  assert model_config("vim_tiny").seq_len == 197 and model_config("vim_tiny").cls_index == 98
  s8 = model_config("vim_small_stride8")
  assert s8.grid_size == (27, 27) and s8.seq_len == 730 and s8.cls_index == 364
  assert model_config("vim_tiny", cls_position="head").cls_index == 0


def test_numpy_reference_reproduces_official_float64_logits(vim_ref):
  """Validates the independent float64 NumPy model used as a second ground truth below."""
  logits = numpy_vim.forward(vim_ref["state_dict"], vim_ref["images_nchw"])
  np.testing.assert_allclose(logits, vim_ref["logits64"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu", "pallas_tpu"])
def test_logits_equal_official(vim_ref, impl):
  """Every scan impl, the Pallas kernels in interpret mode (the GPU one with its fused bidirectional path) with
  layers scanned, so that their kernels are traced and compiled once, not once per layer (`TestScanLayers`
  checks that scanned and unrolled layers agree)."""
  model = ref_model(vim_ref, scan_impl=impl, scan_interpret=True, scan_layers=impl.startswith("pallas"))
  logits = logits_of(model, jnp.asarray(vim_ref["images"]))
  assert logits.dtype == jnp.float32
  assert_rel_close(logits, vim_ref["logits64"], 1e-5, "logits")


def test_every_layer_matches_official_activations(vim_ref):
  """Each layer is fed the official input of that layer, so a regression points at its layer."""
  act = vim_ref["activations"]
  model = ref_model(vim_ref, scan_impl="reference")
  images = jnp.asarray(vim_ref["images"])
  assert_rel_close(model.patch_embed(images), act["patch_embed"], 1e-5, "patch_embed")
  assert_rel_close(model.embed(images), act["embed_tokens"], 1e-5, "embed_tokens")
  for i, block in enumerate(model.layers):
    residual = jnp.asarray(act[f"layer{i}_residual"])
    assert_rel_close(block.norm(residual), act[f"layer{i}_mixer_in"], 1e-5, f"layer{i} norm")
    hidden = block.mixer(jnp.asarray(act[f"layer{i}_mixer_in"]))
    assert_rel_close(hidden, act[f"layer{i}_hidden"], 1e-5, f"layer{i} mixer")
    following = act[f"layer{i + 1}_residual"] if i + 1 < len(model.layers) else act["final_sum"]
    total, out = block((residual, jnp.zeros_like(residual)))
    chex.assert_trees_all_equal(total, residual)  # adding the zeros of no earlier mixer
    assert_rel_close(total + out, following, 1e-5, f"layer{i} block")
  assert_rel_close(model.norm_f(jnp.asarray(act["final_sum"])), act["final_norm"], 1e-5, "norm_f")
  assert_rel_close(model.forward_features(images), act["features"], 1e-5, "features")
  assert_rel_close(model.forward_tokens(images), act["final_norm"], 1e-5, "tokens")


def test_layer0_mixer_internals_match_official(vim_ref):
  act = vim_ref["activations"]
  mixer = ref_model(vim_ref, scan_impl="reference").layers[0].mixer
  e = mixer.cfg.d_inner
  to_channel_major = lambda a: np.asarray(a).transpose(0, 2, 1)  # noqa: E731
  flip = lambda a: np.asarray(a)[..., ::-1]  # noqa: E731  official backward arrays are in flipped order
  xz = mixer.in_proj(jnp.asarray(act["layer0_mixer_in"]))
  assert_rel_close(to_channel_major(xz), act["l0_xz"], 1e-5, "xz")
  x, z = xz[..., :e], xz[..., e:]
  u_f, u_b = jax.nn.silu(mixer.conv1d(x)), jax.nn.silu(mixer.conv1d_b(x, reverse=True))
  assert_rel_close(to_channel_major(u_f), act["l0_fwd_conv_silu"], 1e-5, "fwd conv")
  assert_rel_close(flip(to_channel_major(u_b)), act["l0_bwd_conv_silu"], 1e-5, "bwd conv")
  (projected_f, delta_f), (projected_b, delta_b) = mixer._projections(u_f, u_b)
  forward = mixer._direction(u_f, projected_f, delta_f, mixer.A_log, mixer.D, mixer.dt_proj)
  backward = mixer._direction(u_b, projected_b, delta_b, mixer.A_b_log, mixer.D_b, mixer.dt_proj_b)
  y_fwd, y_bwd = (
    selective_scan(*args[:5], args.D, z, args.delta_bias, delta_softplus=True, reverse=reverse, impl="reference")
    for args, reverse in ((forward, False), (backward, True))
  )
  assert_rel_close(to_channel_major(y_fwd), act["l0_fwd_out_z"], 1e-5, "fwd scan")
  assert_rel_close(flip(to_channel_major(y_bwd)), act["l0_bwd_out_z"], 1e-5, "bwd scan")
  assert_rel_close((y_fwd + y_bwd) / 2, act["l0_combined"], 1e-5, "combined")


@pytest.mark.parametrize(
  "overrides",
  [
    dict(cls_position="head"),
    dict(stride=8),
    dict(img_size=(48, 80)),
  ],
  ids=["head_cls", "stride8", "non_square"],
)
def test_random_models_match_numpy_reference(overrides):
  """Other layouts than the reference checkpoint's, checked against the float64 NumPy model."""
  cfg = ModelConfig(**{**dict(img_size=48, embed_dim=32, depth=2, d_state=8, num_classes=5), **overrides})
  model = VisionMamba(cfg, rngs=nnx.Rngs(3))
  state_dict = convert.to_official_state_dict(model)
  images = np.random.default_rng(0).normal(size=(2, *cfg.img_size, 3)).astype(np.float32)
  expected = numpy_vim.forward(state_dict, images.transpose(0, 3, 1, 2), stride=cfg.stride, cls_index=cfg.cls_index)
  assert_rel_close(logits_of(model, jnp.asarray(images)), expected, 1e-5, "logits")


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_patch_embed_matmul_equals_the_convolution(dtype, tolerance):
  """Non-overlapping patches run as a matmul; it must equal the strided convolution, remainder rows and
  columns (50 and 37 are not multiples of 16) dropped alike."""
  cfg = ModelConfig(img_size=(50, 37), embed_dim=24, dtype=dtype)
  embed = PatchEmbed(cfg, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 50, 37, 3))
  conv = embed.proj(images).reshape(2, -1, 24)
  assert conv.shape == (2, cfg.num_patches, 24)
  assert_rel_close(embed(images), conv, tolerance, "patch tokens")


@pytest.mark.parametrize("form", ["matmul_halves", "matmul_windows"])
def test_in_proj_halves_equal_one_matmul_split_in_value_and_gradient(x64, form):
  """in_proj as two matmuls (no split copy), or as one whose halves are `Columns` windows, computes what one matmul
  and a split does, backward too."""
  rng = np.random.default_rng(0)
  x, kernel = jnp.asarray(rng.normal(size=(2, 5, 6))), jnp.asarray(rng.normal(size=(6, 8)))
  weights = jnp.asarray(rng.normal(size=(2, 2, 5, 4)))

  def loss(halves, x, kernel):
    first, second = halves(x, kernel)
    return jnp.sum(jnp.sin(first) * weights[0]) + jnp.sum(jnp.cos(second) * first * weights[1])

  def split(x, kernel):
    return jnp.split(x @ kernel, 2, axis=-1)

  def halves(x, kernel):
    out = getattr(layers, form)(x, kernel, None)
    return [half.value() if isinstance(half, Columns) else half for half in out]

  want = jax.value_and_grad(functools.partial(loss, split), argnums=(0, 1))(x, kernel)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, halves), argnums=(0, 1)))(x, kernel)
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("batch", [6, 128])
def test_dense_equals_a_matmul_in_value_and_gradient(x64, batch):
  """x_proj, dt_proj and out_proj sum their weight gradients over groups of samples (64 groups of 2 at
  batch 128, 2 of 3 at batch 6): the same gradients as autodiff of one matmul."""
  rng = np.random.default_rng(0)
  x, kernel = jnp.asarray(rng.normal(size=(batch, 5, 6))), jnp.asarray(rng.normal(size=(6, 7)))
  weights = jnp.asarray(rng.normal(size=(batch, 5, 7)))

  def loss(dense, x, kernel):
    return jnp.sum(jnp.sin(dense(x, kernel)) * weights)

  want = jax.value_and_grad(functools.partial(loss, jnp.dot), argnums=(0, 1))(x, kernel)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, lambda x, k: layers.dense(x, k, None)), argnums=(0, 1)))(
    x, kernel
  )
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=0)


def test_blocks_add_and_norm_in_the_kernel_where_the_mixer_kernels_run_and_the_width_fits():
  """`vim.uses_add_norm_kernel`: the kernel with the mixer's other kernels, for widths it takes (multiples of 16);
  XLA for others, and without the kernels."""
  cfg = vim.ModelConfig(embed_dim=32, scan_impl="pallas", scan_interpret=True)
  assert vim.uses_add_norm_kernel(cfg)
  assert not vim.uses_add_norm_kernel(dataclasses.replace(cfg, embed_dim=24))
  assert not vim.uses_add_norm_kernel(dataclasses.replace(cfg, scan_impl="xla"))


def test_materialized_is_a_barrier_only_where_nothing_differentiates():
  """`layers.materialized` (the residual stream written whole, for inference memory) is the identity in value,
  derivative and both autodiff modes, and leaves no barrier in a differentiated program (the training step)."""
  x = jnp.arange(6.0).reshape(2, 3)

  def has_barrier(fn):
    return "optimization_barrier" in jax.jit(fn).lower(x).as_text()

  def f(x):
    return jnp.sum(jnp.sin(layers.materialized(x)))

  chex.assert_trees_all_equal(layers.materialized(x), x)
  assert has_barrier(layers.materialized)
  chex.assert_trees_all_close(jax.grad(f)(x), jnp.cos(x))
  chex.assert_trees_all_close(jax.jvp(f, (x,), (jnp.ones_like(x),))[1], jnp.sum(jnp.cos(x)))
  assert not has_barrier(jax.grad(f))


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_dense_weight_gradient_under_a_mesh(axis_type):
  """With the batch split over 8 devices, the groups of samples split with it (Explicit axes need the
  grouping's sharding said) and the weight gradient still sums over every sample."""
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(kind, kind))
  rng = np.random.default_rng(1)
  x, kernel, weights = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((128, 3, 6), (6, 5), (128, 3, 5)))

  def loss(x, kernel, weights):
    return jnp.sum(jnp.sin(layers.dense(x, kernel, None)) * weights)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  expected = grad(x, kernel, weights)
  with jax.set_mesh(mesh):
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = grad(jax.device_put(x, batch), kernel, jax.device_put(weights, batch))
  assert got[1][0].sharding.is_equivalent_to(batch, x.ndim)  # dx split as x is
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padded_step_rank_changes_no_value(monkeypatch):
  """Vim-Ti's step rank 12 runs zero-padded to 16 (`BiMambaMixer._projections`), B and C read as windows of
  x_proj's output: logits and every gradient equal those of the same model with the padding off (B and C
  then sliced), in float32."""
  model = create_model("vim_tiny", img_size=32, depth=2, scan_impl="xla")
  graphdef, params = nnx.split(model)
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def grads(padded_rank):
    monkeypatch.setattr(vim, "_padded_rank", padded_rank)
    step = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(images))))
    return fast_compile.compiled(step, params)(params)

  assert model.cfg.resolved_dt_rank == 12 and vim._padded_rank(12, 16) == 16
  chex.assert_trees_all_close(grads(vim._padded_rank), grads(lambda rank, state: rank), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
def test_training_step_holds_no_tensor_of_all_states(impl):
  """No array of a Vim-Ti-width training step at 448² (785 tokens) holds the (batch, length, channels,
  state) states of every position, forward or backward: XLA's chunked scan keeps under a quarter, the GPU
  kernels' backward one state per `SUB_CHUNK` positions (a transient buffer; chunks are rounded up to whole
  sub-chunks, hence 5% slack), the TPU kernels one per chunk. The GPU step is lowered for an H100 on any host
  (an abstract device), the TPU step for TPU: the whole model, not only its scan, takes the TPU path."""
  if impl == "pallas_gpu" and not hasattr(jax.sharding, "AbstractDevice"):
    pytest.skip("this jax cannot name an abstract GPU to lower for")
  model = create_model("vim_tiny", img_size=448, depth=2, dtype="bfloat16", scan_impl=impl)
  graphdef, params = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 448, 448, 3), jnp.float32)
  step = jax.jit(jax.value_and_grad(lambda params, images: jnp.mean(nnx.merge(graphdef, params)(images))))
  if impl == "pallas_gpu":
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
      hlo = step.trace(params, images).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_scan_bwd" in hlo and "step_projections" in hlo
  elif impl == "pallas_tpu":
    hlo = step.trace(params, images).lower(lowering_platforms=("tpu",)).as_text()
    kernels = re.findall(r'custom_call @tpu_custom_call.*kernel_name = "(\w+)"', hlo)
    assert sorted(kernels) == ["selective_scan_bwd"] * 4 + ["selective_scan_fwd"] * 4  # 2 layers x 2 directions
  else:
    hlo = step.trace(params, images).lower().as_text()
  sizes = {math.prod(map(int, dims.split("x")[:-1])) for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", hlo)}
  all_states = 2 * model.cfg.seq_len * model.cfg.d_inner * model.cfg.d_state
  kept = 1 / pallas_gpu.SUB_CHUNK if impl == "pallas_gpu" else 1 / 4
  assert max(sizes) < 1.05 * kept * all_states


def test_bfloat16_compute_stays_close_and_keeps_f32_params(vim_ref):
  model = ref_model(vim_ref, dtype="bfloat16")
  assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  logits = logits_of(model, jnp.asarray(vim_ref["images"]))
  assert logits.dtype == jnp.float32
  assert_rel_close(logits, vim_ref["logits64"], 5e-2, "bf16 logits")


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])  # pallas_gpu: the fused mixer, interpret mode
def test_gradients_agree_between_scan_impls(vim_ref, impl):
  """Scanned layers: interpret mode's kernels are traced and compiled once, not once per layer."""
  images = jnp.asarray(vim_ref["images"])

  def grads(impl):
    model = ref_model(vim_ref, scan_impl=impl, scan_interpret=True, scan_layers=True)
    loss = lambda m: jnp.sum(m(images) ** 2)  # noqa: E731
    return parameter_gradients(model, loss)

  g_ref, g_impl = grads("reference"), grads(impl)
  chex.assert_tree_all_finite(g_ref)
  chex.assert_trees_all_close(g_impl, g_ref, rtol=1e-4, atol=1e-6)


def test_in_proj_windows_change_no_value(vim_ref, monkeypatch):
  """in_proj as one matmul whose halves the conv and scan kernels read in place (`IN_PROJ_WINDOWS`, interpret mode):
  the logits and every gradient are those of two matmuls, and the windows path is the one taken."""
  images = jnp.asarray(vim_ref["images"])
  calls = []
  windows = layers.matmul_windows
  monkeypatch.setattr(layers, "matmul_windows", lambda *args: calls.append(1) or windows(*args))

  def logits_and_grads(on: bool):
    monkeypatch.setattr(vim, "IN_PROJ_WINDOWS", on)
    model = ref_model(vim_ref, scan_impl="pallas_gpu", scan_interpret=True, scan_layers=True)
    return logits_of(model, images), parameter_gradients(model, lambda m: jnp.sum(m(images) ** 2))

  want = logits_and_grads(False)
  assert not calls
  got = logits_and_grads(True)
  assert calls
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)


def test_step_projections_kernel_equals_xla_matmuls_in_the_model(vim_ref, monkeypatch):
  """bf16 with the mixer's GPU kernels (interpret mode; the scan in XLA, to compile fast): x_proj and dt_proj as
  `kernels.step_projections` give the logits and parameter gradients of its XLA matmuls."""
  images = jnp.asarray(vim_ref["images"])
  monkeypatch.setattr(vim.conv_silu, "uses_kernels", lambda impl, interpret: interpret)

  def logits_and_grads():
    model = ref_model(vim_ref, dtype="bfloat16", scan_impl="xla", scan_interpret=True, scan_layers=True)
    loss = lambda m: jnp.sum(m(images) ** 2)  # noqa: E731
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(images))(state))
    return "name=step_projections" in jaxpr, logits_of(model, images), parameter_gradients(model, loss)

  kernel, logits, grads = logits_and_grads()
  monkeypatch.setattr(vim.projections_kernel, "supported", lambda *args: False)
  xla, xla_logits, xla_grads = logits_and_grads()
  assert kernel and not xla
  assert_rel_close(logits, xla_logits, 1e-2, "logits")
  for (path, got), (_, want) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(xla_grads)):
    assert_rel_close(got[...], want[...], 3e-2, "/".join(map(str, path)))


@pytest.mark.parametrize("kernel", ["add_norm_project", "projected_add_norm"])
def test_boundary_kernel_runs_undifferentiated_and_equals_the_separate_launches(vim_ref, monkeypatch, kernel):
  """bf16 with the mixer's GPU kernels (interpret mode; the scan in XLA, to compile fast): where nothing is
  differentiated and the rows rule says so, the blocks' add + norm runs as one kernel with the next in_proj
  (`add_norm.add_norm_project`, few rows) or with the last out_proj (`add_norm.projected_add_norm`, many rows; the
  rule lowered here to the test's rows), with the logits of the separate launches; differentiated, the separate
  launches run (the same parameter gradients as without the kernel)."""
  images = jnp.asarray(vim_ref["images"])
  monkeypatch.setattr(vim.conv_silu, "uses_kernels", lambda impl, interpret: interpret)
  seq_len = convert.infer_config(vim_ref["state_dict"], img_size=64)[0].seq_len
  if kernel == "projected_add_norm":
    monkeypatch.setattr(vim.add_norm, "PROJECTED_MIN_ROWS", images.shape[0] * seq_len)
    outside_rule = images.shape[0] - 1  # a batch of fewer rows
  else:
    outside_rule = add_norm.PROJECT_MAX_ROWS // seq_len + 1  # a batch of more rows

  def run():
    model = ref_model(vim_ref, dtype="bfloat16", scan_impl="xla", scan_interpret=True, scan_layers=True)
    graphdef, state = nnx.split(model)
    forward = str(jax.make_jaxpr(lambda state: nnx.merge(graphdef, state)(images))(state))
    loss = lambda m: jnp.sum(m(images) ** 2)  # noqa: E731
    differentiated = str(jax.make_jaxpr(lambda state: jax.grad(lambda s: loss(nnx.merge(graphdef, s)))(state))(state))
    other = jax.ShapeDtypeStruct((outside_rule, *images.shape[1:]), images.dtype)
    past_the_rule = str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, other))
    names = [text.count(f"name={kernel}") for text in (forward, differentiated, past_the_rule)]
    outputs = logits_of(model, images), tokens_of(model, images)
    return names, outputs, parameter_gradients(model, loss)

  names, outputs, grads = run()
  supported = "project_supported" if kernel == "add_norm_project" else "projected_supported"
  monkeypatch.setattr(vim.add_norm, supported, lambda *args: False)
  separate_names, separate_outputs, separate_grads = run()
  assert names == [1, 0, 0] and separate_names == [0, 0, 0]  # one kernel in the layer scan's body, up to the rows rule
  for got, want, name in zip(outputs, separate_outputs, ("logits", "tokens"), strict=True):
    assert_rel_close(got, want, 1e-2, name)
  if kernel == "add_norm_project":
    chex.assert_trees_all_equal(grads, separate_grads)
  else:  # out_proj runs in the next block (and for the cls row alone after the last): the same values, other roundings
    for (path, got), (_, want) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(separate_grads)):
      assert_rel_close(got[...], want[...], 2e-2, "/".join(map(str, path)))


def test_stream_with_out_proj_runs_under_a_mesh(monkeypatch):
  """Where the blocks pass on their mixer's output before out_proj with its weight (`projects_between_blocks`, the
  rule lowered to these rows), Vim-Ti's logits with the batch split over 8 devices (the trainer's Auto axes) match
  those without a mesh (to bf16's roundings: XLA's fusions of the bf16 model differ under a mesh, with or without
  this path)."""
  monkeypatch.setattr(vim.conv_silu, "uses_kernels", lambda impl, interpret: interpret)
  monkeypatch.setattr(vim.add_norm, "PROJECTED_MIN_ROWS", 1)
  model = create_model(
    "vim_tiny", img_size=32, depth=2, dtype="bfloat16", scan_impl="xla", scan_interpret=True, scan_layers=True
  )
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  graphdef, state = nnx.split(model)
  call = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
  assert "name=projected_add_norm" in str(jax.make_jaxpr(call)(state, images))
  forward = jax.jit(call, compiler_options=fast_compile.OPTIONS)
  expected = forward(state, images)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = forward(state, jax.device_put(images, batch))
  assert_rel_close(got, expected, 2e-2, "logits")


@pytest.mark.parametrize("path", ["reference", "xla", "kernels", "deit"])
def test_loss_and_gradients_under_explicit_mesh_axes(monkeypatch, path):
  """Under a mesh of Explicit axes (`jax.make_mesh`'s default in newer JAX; the trainer's are Auto), with the batch
  split over 8 devices, Vim-Ti's loss and every parameter gradient equal those without a mesh, in float32: with the
  reference or the XLA scan, and with the mixer's kernels (interpret mode; the scan in XLA) and the stream that
  carries out_proj (the rows rule lowered); DeiT-Ti's too."""
  if path == "kernels":
    monkeypatch.setattr(vim.conv_silu, "uses_kernels", lambda impl, interpret: interpret)
    monkeypatch.setattr(vim.add_norm, "PROJECTED_MIN_ROWS", 1)
  if path == "deit":
    model = create_model("deit_tiny", img_size=32, depth=2)
  else:
    scan_impl = "xla" if path == "kernels" else path
    model = create_model("vim_tiny", img_size=32, depth=2, scan_impl=scan_impl, scan_interpret=path == "kernels")
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  graphdef, state = nnx.split(model)
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x) ** 2)  # noqa: E731
  loss_and_grads = jax.jit(jax.value_and_grad(loss), compiler_options=fast_compile.OPTIONS)
  expected = loss_and_grads(state, images)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = loss_and_grads(state, jax.device_put(images, batch))
  for (key, value), (_, want) in zip(*(jax.tree.leaves_with_path(tree) for tree in (got, expected)), strict=True):
    assert_rel_close(value, want, 1e-4, jax.tree_util.keystr(key))


@pytest.fixture(scope="module")
def tiny_init_params():
  model = create_model("vim_tiny", rngs=nnx.Rngs(0))
  return convert.to_official_state_dict(model)


class TestInit:
  """Freshly built Vim-Ti follows the official init rules (vim_spec.md §2)."""

  @pytest.fixture
  def params(self, tiny_init_params):
    return tiny_init_params

  def test_normal_inits(self, params):
    np.testing.assert_allclose(params["patch_embed.proj.weight"].std(), math.sqrt(1 / 768) / 0.8796, rtol=0.02)
    for name in ("pos_embed", "cls_token", "head.weight"):
      assert abs(params[name].std() - 0.02) < (0.004 if name == "cls_token" else 0.001), name
    for name in ("patch_embed.proj.bias", "head.bias"):
      assert not params[name].any(), name

  def test_uniform_inits(self, params):
    d, e, r, depth = 192, 384, 12, 24
    bounds = {
      "in_proj.weight": d**-0.5,
      "x_proj.weight": e**-0.5,
      "x_proj_b.weight": e**-0.5,
      "dt_proj.weight": r**-0.5,
      "dt_proj_b.weight": r**-0.5,
      "conv1d.weight": 0.5,
      "conv1d.bias": 0.5,
      "conv1d_b.weight": 0.5,
      "conv1d_b.bias": 0.5,
      "out_proj.weight": (e * depth) ** -0.5,
    }
    for name, bound in bounds.items():
      values = np.concatenate([params[f"layers.{i}.mixer.{name}"].ravel() for i in range(depth)])
      assert np.abs(values).max() <= bound, name
      np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.05, err_msg=name)

  def test_ssm_inits(self, params):
    for i in range(24):
      p = lambda n: params[f"layers.{i}.mixer.{n}"]  # noqa: E731,B023
      np.testing.assert_allclose(p("A_log"), np.log(np.tile(np.arange(1, 17), (384, 1))), rtol=1e-6)
      np.testing.assert_array_equal(p("A_b_log"), p("A_log"))
      np.testing.assert_array_equal(p("D"), 1.0)
      np.testing.assert_array_equal(p("D_b"), 1.0)
      dt = np.log1p(np.exp(p("dt_proj.bias")))
      assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and np.log(dt).std() > 1.0
      assert not p("dt_proj_b.bias").any()  # the official asymmetric init: softplus(0) = ln 2
      np.testing.assert_array_equal(params[f"layers.{i}.norm.weight"], 1.0)
    np.testing.assert_array_equal(params["norm_f.weight"], 1.0)


def small_model(**overrides) -> VisionMamba:
  cfg = ModelConfig(**{**dict(img_size=32, embed_dim=16, depth=3, num_classes=3), **overrides})
  return VisionMamba(cfg, rngs=nnx.Rngs(0))


class TestDropPath:
  @pytest.fixture
  def model(self):
    return small_model(drop_path_rate=0.5)

  def test_deterministic_without_rngs(self, model):
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    np.testing.assert_array_equal(logits_of(model, images), logits_of(model, images))

  def test_stochastic_with_rngs(self, model):
    images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    train = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
    a, b = train(model, images, nnx.Rngs(dropout=1)), train(model, images, nnx.Rngs(dropout=2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, train(model, images, nnx.Rngs(dropout=1)))

  def test_drops_whole_samples_and_rescales(self):
    x = jnp.ones((4000, 3, 2))
    out = np.asarray(layers.drop_path(x, 0.3, nnx.Rngs(dropout=0)))
    per_sample = out.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # the whole sample is kept or dropped
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.7)}
    assert abs((per_sample[:, 0] == 0).mean() - 0.3) < 0.03

  def test_bf16_is_divided_in_float32_then_rounded(self):
    """As PyTorch's `x.div(keep_prob)` of a bf16 tensor: keep is not rounded to bf16 first (0.7 would become
    0.69921875)."""
    x = jnp.full((64, 3), 1.046875, jnp.bfloat16)
    out = layers.drop_path(x, 0.3, nnx.Rngs(dropout=0))
    assert out.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(out, np.float32))) == {0.0, 1.4921875}  # 1.046875 / 0.7 = 1.4955, rounded
    assert float(x[0, 0] / jnp.asarray(0.7, jnp.bfloat16)) == 1.5  # not this, from keep rounded first

  def test_traced_rate_of_zero_is_exact_identity(self):
    x = jax.random.normal(jax.random.key(0), (8, 3, 2))
    out = jax.jit(lambda rate: layers.drop_path(x, rate, nnx.Rngs(dropout=0)))(jnp.float32(0.0))
    np.testing.assert_array_equal(out, x)

  def test_linear_rule(self, model):
    assert model.drop_path_rates == (0.0, 0.25, 0.5)


class TestBadInput:
  @pytest.fixture
  def model(self):
    return small_model(depth=1)

  @pytest.mark.parametrize("shape", [(2, 64, 64, 3), (2, 32, 32, 1), (2, 3, 32, 32), (32, 32, 3)])
  def test_wrong_image_shape(self, model, shape):
    with pytest.raises(ValueError, match=r"`images` must be NHWC with shape \(batch, 32, 32, 3\)"):
      model(jnp.zeros(shape))

  def test_integer_images(self, model):
    with pytest.raises(TypeError, match="`images` must be a floating-point array"):
      model(jnp.zeros((1, 32, 32, 3), jnp.uint8))

  @pytest.mark.parametrize(
    "kwargs, match",
    [
      (dict(cls_position="tail"), "`cls_position`"),
      (dict(img_size=8), "`img_size`"),
      (dict(depth=0), "`depth`"),
      (dict(drop_path_rate=1.0), "`drop_path_rate`"),
    ],
  )
  def test_bad_config(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      ModelConfig(**kwargs)

  def test_unknown_name_and_field(self):
    with pytest.raises(ValueError, match="unknown model name 'vim_huge'"):
      create_model("vim_huge")
    with pytest.raises(TypeError, match="if_devide_out"):
      create_model("vim_tiny", if_devide_out=True)


def test_features_tokens_and_headless():
  model = small_model(depth=1)
  images = jnp.ones((2, 32, 32, 3))
  assert jax.eval_shape(model.forward_tokens, images).shape == (2, 5, 16)
  assert jax.eval_shape(model.forward_features, images).shape == (2, 16)
  headless = VisionMamba(dataclasses.replace(model.cfg, num_classes=0), rngs=nnx.Rngs(0))
  assert headless.head is None and jax.eval_shape(headless, images).shape == (2, 16)


SCAN_IMAGES = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))


def logits_and_grads(model: VisionMamba):
  graphdef, params = nnx.split(model)

  def loss(params):
    logits = nnx.merge(graphdef, params)(SCAN_IMAGES)
    return jnp.sum(jnp.tanh(logits)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.fixture(scope="module")
def unrolled_logits_and_grads():
  return logits_and_grads(small_model(scan_layers=False, scan_impl="reference"))


class TestScanLayers:
  """`scan_layers` (one lax.scan over the stacked blocks) against the unrolled Python loop: the same function."""

  def test_same_param_tree(self):
    scanned, unrolled = small_model(scan_layers=True), small_model(scan_layers=False)
    chex.assert_trees_all_equal(nnx.state(scanned), nnx.state(unrolled))
    assert len(scanned.layers) == 3

  @pytest.mark.parametrize("remat", [False, True])
  def test_logits_and_gradients_equal_unrolled(self, unrolled_logits_and_grads, remat):
    logits, grads = logits_and_grads(small_model(scan_layers=True, remat=remat, scan_impl="reference"))
    expected_logits, expected_grads = unrolled_logits_and_grads
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-7)
    chex.assert_tree_all_finite(grads)

  def test_drop_path_draws_the_same_masks_as_unrolled(self):
    scanned, unrolled = (small_model(scan_layers=scan, drop_path_rate=0.5) for scan in (True, False))
    train = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
    logits = train(scanned, SCAN_IMAGES, nnx.Rngs(dropout=1))
    np.testing.assert_allclose(logits, train(unrolled, SCAN_IMAGES, nnx.Rngs(dropout=1)), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(logits, train(scanned, SCAN_IMAGES, nnx.Rngs(dropout=1)))
    assert not np.allclose(logits, logits_of(scanned, SCAN_IMAGES))  # drop path did drop something

  def test_blocks_of_different_structure_raise(self):
    model = small_model(depth=2)
    blocks = [model.layers[0], Block(dataclasses.replace(model.cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))]
    x = jnp.zeros((1, 5, 16))
    with pytest.raises(ValueError, match=r"block 1 \(Block\) differs from block 0"):
      layers.apply_blocks(blocks, x, None, rates=(0.0, 0.0), scan=True, remat=False)
