"""The DeiT baseline: timm's parameter counts and init, a float64 NumPy forward, gradients, options, errors."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fast_compile import logits_of
from flax import nnx
from jax.flatten_util import ravel_pytree

from vim_jax.models import DeiT, DeiTConfig, create_model
from vim_jax.models.deit import Attention, _attention, exact_gelu

# timm's parameter counts at 1000 classes (sum of p.numel() of deit_*_patch16_224).
TIMM_PARAM_COUNTS = {"deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656}

TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=4, num_classes=5)


def tiny_model(seed: int = 0, **overrides) -> DeiT:
  return DeiT(DeiTConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


def param_count(model: nnx.Module) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """{"blocks.0.attn.qkv.kernel": array, ...} in float64."""
  state = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): np.asarray(v[...], np.float64) for path, v in state}


def randomize(model: nnx.Module, seed: int = 0) -> None:
  """Every param ~ N(0, 0.5²): the init's small weights make attention near-uniform, hiding layout bugs."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), state))


# ----------------------------------------------------------------------------------------------
# Float64 NumPy reference, written from timm's PyTorch code (qkv laid out as (3, heads, head_dim)).
# ----------------------------------------------------------------------------------------------


def sub(p: dict, prefix: str) -> dict:
  """The params of one module, keyed relative to it."""
  return {k.removeprefix(prefix): v for k, v in p.items() if k.startswith(prefix)}


def np_layer_norm(x, p, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_attention(x, p, heads):
  b, n, d = x.shape
  qkv = x @ p["qkv.kernel"] + p["qkv.bias"]
  q, k, v = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)  # each (b, heads, n, head_dim)
  logits = q @ k.swapaxes(-1, -2) / math.sqrt(d // heads)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  return out @ p["proj.kernel"] + p["proj.bias"]


def np_deit(p, images, cfg: DeiTConfig):
  b, h, w, c = images.shape
  s = cfg.patch_size
  patches = images.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, s * s * c)
  x = patches @ p["patch_embed.proj.kernel"].reshape(s * s * c, -1) + p["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, x.shape[-1])), x], axis=1) + p["pos_embed"]
  gelu = np.vectorize(lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2))))
  for i in range(cfg.depth):
    blk = sub(p, f"blocks.{i}.")
    x = x + np_attention(np_layer_norm(x, sub(blk, "norm1.")), sub(blk, "attn."), cfg.num_heads)
    hidden = gelu(np_layer_norm(x, sub(blk, "norm2.")) @ blk["mlp.fc1.kernel"] + blk["mlp.fc1.bias"])
    x = x + hidden @ blk["mlp.fc2.kernel"] + blk["mlp.fc2.bias"]
  return np_layer_norm(x, sub(p, "norm."))[:, 0] @ p["head.kernel"] + p["head.bias"]


def assert_rel_close(actual, expected, rtol: float) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  assert np.max(np.abs(actual - expected)) <= rtol * np.max(np.abs(expected))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TIMM_PARAM_COUNTS))
def test_variants_match_timm_param_counts_and_shapes(name):
  model = nnx.eval_shape(lambda: create_model(name))
  assert param_count(model) == TIMM_PARAM_COUNTS[name]
  assert model.cfg.seq_len == 197 and len(model.blocks) == 12
  logits = nnx.eval_shape(lambda: create_model(name)(jnp.zeros((2, 224, 224, 3))))
  assert (logits.shape, logits.dtype) == ((2, 1000), jnp.float32)


def test_small_config_shapes_and_headless():
  model = tiny_model()
  images = jnp.ones((3, 32, 32, 3))
  assert jax.eval_shape(model, images).shape == (3, 5)
  assert jax.eval_shape(model.forward_tokens, images).shape == (3, 17, 16)
  assert jax.eval_shape(model.forward_features, images).shape == (3, 16)
  headless = DeiT(dataclasses.replace(model.cfg, num_classes=0), rngs=nnx.Rngs(0))
  assert headless.head is None and jax.eval_shape(headless, images).shape == (3, 16)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_attention_equals_softmax_qk_v(impl):
  cfg = DeiTConfig(**TINY, attention_impl=impl)
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  randomize(attn)
  x = np.random.default_rng(0).normal(size=(2, 7, 16))
  expected = np_attention(x, flat_params(attn), cfg.num_heads)
  assert_rel_close(attn(jnp.asarray(x, jnp.float32)), expected, 1e-5)


def test_even_padding_for_cudnn_keeps_output_and_gradients():
  """The cuDNN path pads an odd length by one masked key (jax 0.11.2's cuDNN training rule refuses odd lengths);
  run through the XLA path, output and gradients equal the unpadded attention's. An unmasked zero key would not."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 4, 8))
  w = jax.random.normal(jax.random.key(1), (2, 7, 4, 8))

  def loss(qkv, pad):
    return jnp.sum(w * jnp.tanh(_attention(*qkv, implementation="xla", pad_to_even=pad)))

  plain, padded = (jax.jit(jax.value_and_grad(loss), static_argnums=1)((q, k, v), pad) for pad in (False, True))
  chex.assert_trees_all_close(padded, plain, rtol=1e-5, atol=1e-6)


def test_cudnn_config_pads_odd_lengths_where_differentiated(monkeypatch):
  """Attention with attention_impl="cudnn" hands cuDNN an even length where it is differentiated and the odd one where
  it is not (inference), here through a stand-in on CPU; the gradient is the unpadded XLA path's."""
  lengths, original = [], jax.nn.dot_product_attention

  def stand_in(q, k, v, implementation=None, **kwargs):
    lengths.append((implementation, q.shape[1]))
    return original(q, k, v, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  cfgs = (DeiTConfig(**TINY, dtype="bfloat16", attention_impl=impl) for impl in ("cudnn", "xla"))
  cudnn, xla = (Attention(cfg, rngs=nnx.Rngs(0)) for cfg in cfgs)
  assert_rel_close(cudnn(x), xla(x), 1e-2)
  assert lengths == [("cudnn", 7), ("xla", 7)]
  lengths.clear()
  grads = [jax.grad(lambda x, m=m: jnp.sum(jnp.tanh(m(x).astype(jnp.float32))))(x) for m in (cudnn, xla)]
  assert_rel_close(grads[0], grads[1], 2e-2)
  assert lengths == [("cudnn", 8), ("xla", 7)]


def test_exact_gelu_is_rounded_once_from_float32_or_wider():
  """bf16 GELU equals the float64 erf form rounded to bf16 at every point of a grid (jax.nn.gelu on bf16 misses 43% of
  them, by up to 15 ulps); float64 stays float64."""
  gelu64 = lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))  # noqa: E731
  x = jnp.linspace(-6.0, 6.0, 4001, dtype=jnp.float32).astype(jnp.bfloat16)
  expected = gelu64(np.asarray(x, np.float64))
  np.testing.assert_array_equal(
    np.asarray(exact_gelu(x), np.float64), np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float64)
  )
  with jax.enable_x64(True):
    y = np.linspace(-6.0, 6.0, 101)
    np.testing.assert_allclose(exact_gelu(jnp.asarray(y)), gelu64(y), rtol=1e-12, atol=1e-15)


def test_logits_equal_numpy_reference():
  model = tiny_model()
  randomize(model, seed=1)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3))
  expected = np_deit(flat_params(model), images, model.cfg)
  assert_rel_close(logits_of(model, jnp.asarray(images, jnp.float32)), expected, 1e-5)


def test_gradients_match_finite_differences_in_float64():
  """Per parameter: the gradient along a random direction in it equals a central difference of the loss.

  Tolerance 1e-2: jax.nn.dot_product_attention's XLA path takes its softmax in float32 even in x64 mode,
  which the difference quotient amplifies; a wrong gradient is off by O(1).
  """
  model = tiny_model(dtype="float64")  # built outside x64 mode, where the init ops are already compiled
  randomize(model)
  graphdef, state = nnx.split(model)
  with jax.enable_x64(True):
    flat, unravel = ravel_pytree(jax.tree.map(lambda a: a.astype(jnp.float64), state))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)))
    weights = jnp.asarray(rng.normal(size=(2, 5)))
    loss = jax.jit(lambda v: jnp.sum(weights * jnp.tanh(nnx.merge(graphdef, unravel(v))(images))))
    grad = np.asarray(jax.jit(jax.grad(loss))(flat))
    start, eps = 0, 1e-3
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:  # ravel_pytree's order
      direction = np.zeros(flat.size)
      direction[start : start + leaf.size] = rng.normal(size=leaf.size)
      start += leaf.size
      numerical = (loss(flat + eps * direction) - loss(flat - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(grad @ direction, numerical, rtol=1e-2, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_every_parameter_gets_a_finite_nonzero_gradient():
  model = tiny_model()
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  weights = jax.random.normal(jax.random.key(1), (2, 5))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(weights * m(images))))(model)
  for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_init_follows_timm():
  p = flat_params(tiny_model())
  bound = 1 / math.sqrt(3 * 8 * 8)  # PyTorch's Conv2d default, which timm keeps for the patch conv
  for name in ("patch_embed.proj.kernel", "patch_embed.proj.bias"):
    assert np.abs(p[name]).max() <= bound and p[name].std() > 0.8 * bound / math.sqrt(3), name
  trunc_normal = [v for k, v in p.items() if k.endswith((".kernel", "cls_token", "pos_embed")) and "patch" not in k]
  assert len(trunc_normal) == 2 * 4 + 3 and all(np.abs(v).max() > 0 for v in trunc_normal)
  assert abs(np.concatenate([v.ravel() for v in trunc_normal]).std() - 0.02) < 0.001
  for name, value in p.items():
    if name.endswith(".scale"):
      np.testing.assert_array_equal(value, 1.0, err_msg=name)
    elif name.endswith(".bias") and not name.startswith("patch"):
      assert not value.any(), name


def test_bfloat16_compute_keeps_f32_params_and_stays_close():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model = tiny_model(dtype="bfloat16")
  assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  logits = logits_of(model, images)
  assert logits.dtype == jnp.float32
  assert_rel_close(logits, logits_of(tiny_model(), images), 5e-2)


def test_drop_path_is_stochastic_only_with_rngs():
  model = tiny_model(drop_path_rate=0.5)
  assert model.drop_path_rates == (0.0, 0.5)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  train = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
  a, b = train(model, images, nnx.Rngs(dropout=1)), train(model, images, nnx.Rngs(dropout=2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train(model, images, nnx.Rngs(dropout=1)))
  np.testing.assert_array_equal(logits_of(model, images), logits_of(model, images))


def test_scanned_blocks_equal_unrolled():
  """One lax.scan over the blocks (the default, checked without drop path against NumPy above) computes
  what the Python loop does, drop-path masks included."""
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  train = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs))
  scanned, unrolled = (tiny_model(drop_path_rate=0.5, scan_layers=scan) for scan in (True, False))
  chex.assert_trees_all_equal(nnx.state(scanned), nnx.state(unrolled))
  expected = train(unrolled, images, nnx.Rngs(dropout=1))
  np.testing.assert_allclose(train(scanned, images, nnx.Rngs(dropout=1)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(attention_impl="flash"), "`attention_impl`"),
    (dict(attention_impl="cudnn"), "needs dtype bfloat16"),
    (dict(num_heads=5), "not divisible"),
    (dict(img_size=4), "`img_size`"),
    (dict(drop_path_rate=1.0), "`drop_path_rate`"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DeiTConfig(**{**TINY, **kwargs})


def test_bad_input_and_unknown_field():
  model = tiny_model()
  with pytest.raises(ValueError, match=r"`images` must be NHWC with shape \(batch, 32, 32, 3\)"):
    model(jnp.zeros((2, 3, 32, 32)))
  with pytest.raises(TypeError, match="floating-point"):
    model(jnp.zeros((2, 32, 32, 3), jnp.uint8))
  with pytest.raises(TypeError, match="unknown DeiTConfig field"):
    create_model("deit_tiny", stride=8)
  assert DeiTConfig(attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"
