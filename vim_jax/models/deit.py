"""DeiT (Touvron et al. 2021) in Flax NNX: the attention baseline the Vim paper compares against.

The architecture of timm's `deit_{tiny,small,base}_patch16_224`: a ViT with the cls token at the front,
a learned position embedding, pre-norm blocks (LayerNorm eps 1e-6, MHSA with qkv bias, MLP ratio 4 with
exact GELU), a final norm and a linear head on the cls token. Attribute names mirror timm's
(`patch_embed.proj`, `blocks[i].attn.qkv`, `mlp.fc1`, `norm`, `head`) so that weight import is a table.
Numerics follow the Vim model: float32 params and residual stream, matmuls in `cfg.dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vim_jax.models import layers
from vim_jax.models.vim import PatchEmbed, _linear

ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DeiTConfig:
  """Architecture and numerics of a DeiT model. Defaults are DeiT-Ti at 224² (timm `deit_tiny_patch16_224`)."""

  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  num_classes: int = 1000  # 0 = no head (features only)
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6
  # Numerics and kernels.
  dtype: str = "float32"  # compute dtype of matmuls and activations; "bfloat16" on accelerators
  matmul_precision: str | None = None  # e.g. "highest" to avoid TF32 in float32 on GPUs
  # `implementation` of jax.nn.dot_product_attention: None (XLA), "xla" or "cudnn" (flash attention, bf16/fp16
  # only; training needs an even length there, so `_attention` pads an odd one, such as 197 at 224², by a masked key).
  attention_impl: str | None = None
  scan_layers: bool = False  # one lax.scan over the blocks (layers.apply_blocks; trade-offs at ModelConfig)

  def __post_init__(self):
    if isinstance(self.img_size, int):
      object.__setattr__(self, "img_size", (self.img_size, self.img_size))
    object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
    for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"`embed_dim` {self.embed_dim} is not divisible by `num_heads` {self.num_heads}")
    if min(self.img_size) < self.patch_size:
      raise ValueError(f"`img_size` {self.img_size} is smaller than `patch_size` {self.patch_size}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"`drop_path_rate` must be in [0, 1), got {self.drop_path_rate}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"`attention_impl` must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
    if self.attention_impl == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"`attention_impl='cudnn'` needs dtype bfloat16 or float16, got {self.dtype!r}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def stride(self) -> int:
    """Patches do not overlap; the field the shared `PatchEmbed` reads."""
    return self.patch_size

  @property
  def grid_size(self) -> tuple[int, int]:
    return tuple(s // self.patch_size for s in self.img_size)

  @property
  def num_patches(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  @property
  def seq_len(self) -> int:
    return self.num_patches + 1

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> DeiTConfig:
    return cls(**values)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None, pad_to_even: bool) -> jax.Array:
  """jax.nn.dot_product_attention on (batch, length, heads, head_dim). With `pad_to_even`, an odd length is padded
  by one token where the attention is differentiated (jax 0.11.2's cuDNN training rule refuses odd lengths), masked
  as a key and sliced off the output, which leaves the result and its gradients unchanged. Undifferentiated, it runs
  unpadded: DeiT-Ti's forward on an H200 took 3.32 against 3.70 ms padded at 224², batch 128, 24.76 against 25.15 at
  1024², batch 32, within 1% at 1248² (deit_padding_ab_h200.txt)."""
  if not (pad_to_even and q.shape[1] % 2):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  return _padded_where_differentiated(q, k, v, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _padded_where_differentiated(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
  """The attention unpadded; differentiated, `_padded_attention`'s value and its vjp."""
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _padded_fwd(q, k, v, implementation):
  return jax.vjp(functools.partial(_padded_attention, implementation=implementation), q, k, v)


def _padded_bwd(implementation, vjp, d_out):
  del implementation
  return vjp(d_out)


_padded_where_differentiated.defvjp(_padded_fwd, _padded_bwd)


def _padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
  """Attention over an odd length padded by one key, masked (`key_value_seq_lengths`), the padded query sliced off."""
  n = q.shape[1]
  q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :n]


# timm `_init_weights`: every Linear weight, the cls token and the position embedding ~ trunc_normal(.02).
_TRUNC_NORMAL = layers.trunc_normal(0.02)


class Attention(nnx.Module):
  """timm `Attention`: fused qkv with bias, `jax.nn.dot_product_attention`, output projection."""

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.qkv = _linear(cfg, d, 3 * d, use_bias=True, kernel_init=_TRUNC_NORMAL, rngs=rngs)
    self.proj = _linear(cfg, d, d, use_bias=True, kernel_init=_TRUNC_NORMAL, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (batch, length, dim) -> (batch, length, dim)."""
    cfg = self.cfg
    b, n, d = x.shape
    # timm's qkv layout: output features are (3, heads, head_dim), so imported weights split the same way.
    q, k, v = jnp.unstack(self.qkv(x).reshape(b, n, 3, cfg.num_heads, cfg.head_dim), axis=2)
    with jax.default_matmul_precision(cfg.matmul_precision):  # the XLA path has no precision argument
      # jax 0.11.2's cuDNN training rule raises "Unsupported sequence length Q 197, KV 197." for odd lengths.
      out = _attention(q, k, v, cfg.attention_impl, pad_to_even=cfg.attention_impl == "cudnn")
    return self.proj(out.reshape(b, n, d))


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU's erf form (PyTorch's nn.GELU), computed in at least float32 and rounded once to x's dtype, as PyTorch
  computes it for bf16 (its opmath).

  jax.nn.gelu on bf16 rounds erfc's argument to bf16: outputs up to 15 bf16 ulps off, 43% of them not the rounded
  value, over a grid of [-6, 6]; and XLA writes that argument in a pass of its own over the MLP's hidden (DeiT-Ti at
  1024², batch 32, compiled for an H100: 36 fusions write the hidden, 24 in float32 as with the tanh form)."""
  return jax.nn.gelu(x.astype(jnp.promote_types(x.dtype, jnp.float32)), approximate=False).astype(x.dtype)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (timm `Mlp`; PyTorch's nn.GELU is the erf form)."""

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    self.fc1 = _linear(cfg, d, hidden, use_bias=True, kernel_init=_TRUNC_NORMAL, rngs=rngs)
    self.fc2 = _linear(cfg, hidden, d, use_bias=True, kernel_init=_TRUNC_NORMAL, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(exact_gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block; both branches join the float32 residual stream through drop path."""

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.norm1 = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = nnx.LayerNorm(cfg.embed_dim, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, *, drop_rate: float | jax.Array = 0.0, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`drop_rate` is an argument, not an attribute, so that all blocks share one structure (layer scan)."""
    x = x + layers.drop_path(self.attn(self.norm1(x)).astype(jnp.float32), drop_rate, rngs)
    return x + layers.drop_path(self.mlp(self.norm2(x)).astype(jnp.float32), drop_rate, rngs)


class DeiT(nnx.Module):
  """The DeiT backbone and classifier. `model(images)` takes NHWC images and returns logits."""

  def __init__(self, cfg: DeiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    # timm leaves the patch conv at PyTorch's Conv2d default, U(±1/sqrt(fan_in)) for weight and bias,
    # where the shared PatchEmbed uses Vim's lecun normal: redraw it.
    conv_init = layers.uniform_symmetric((cfg.in_chans * cfg.patch_size**2) ** -0.5)
    for param in (self.patch_embed.proj.kernel, self.patch_embed.proj.bias):
      param[...] = conv_init(rngs.params(), param.shape)
    self.cls_token = nnx.Param(_TRUNC_NORMAL(rngs.params(), (1, 1, d)))
    self.pos_embed = nnx.Param(_TRUNC_NORMAL(rngs.params(), (1, cfg.seq_len, d)))
    self.drop_path_rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depth)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=jnp.float32, rngs=rngs)
    if cfg.num_classes > 0:
      self.head = _linear(cfg, d, cfg.num_classes, use_bias=True, kernel_init=_TRUNC_NORMAL, rngs=rngs)
    else:
      self.head = None

  def embed(self, images: jax.Array) -> jax.Array:
    """cls token followed by the patch tokens, plus the position embedding (float32)."""
    cfg = self.cfg
    expected = (*cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"`images` must be NHWC with shape (batch, {', '.join(map(str, expected))}), got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"`images` must be a floating-point array, got dtype {images.dtype}")
    x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype))).astype(jnp.float32)
    cls = layers.sharded_as(jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])), x)
    return jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]

  def forward_tokens(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The final-normed token sequence (batch, 1 + patches, dim), float32, cls first."""
    x = layers.apply_blocks(
      self.blocks, self.embed(images), rngs, rates=self.drop_path_rates, scan=self.cfg.scan_layers, remat=False
    )
    return self.norm(x)

  def forward_features(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The pre-head feature (batch, dim): the final cls token."""
    return self.forward_tokens(images, rngs=rngs)[:, 0]

  def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits (batch, num_classes) in float32; drop path is active only when `rngs` is given."""
    features = self.forward_features(images, rngs=rngs)
    if self.head is None:
      return features
    return self.head(features.astype(jnp.dtype(self.cfg.dtype))).astype(jnp.float32)
