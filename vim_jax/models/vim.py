"""Vision Mamba (Vim) in Flax NNX, flag for flag the official `VisionMamba` with bimamba v2.

Attribute names mirror the official PyTorch module names (`patch_embed.proj`, `layers[i].mixer.in_proj`,
`conv1d_b`, `A_b_log`, `norm_f`, `head`) so that weight conversion is a table (see `convert.py`).
Shapes are token-major throughout: tokens (batch, length, dim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from kernels import (
  Columns,
  Direction,
  NegativeExp,
  add_norm,
  conv_silu,
  conv_silu_bidirectional,
  selective_scan_bidirectional,
)
from kernels import step_projections as projections_kernel
from vim_jax.models import layers

# The conv + SiLU impl for each scan impl that has a GPU kernel (the rest run the conv in XLA); x_proj and dt_proj
# run as `kernels.step_projections` where the conv runs its kernels.
_CONV_IMPLS = {None: None, "pallas": "pallas", "pallas_gpu": "pallas_gpu"}
# Where those kernels run, True makes in_proj one matmul whose halves x and z they read in place
# (`layers.matmul_windows`), else two matmuls write each half contiguous (`layers.matmul_halves`). Off, as it is
# faster but larger: Vim-Ti's forward at batch 32, H100: 45.05 -> 44.51 ms at 1248², 30.89 -> 30.51 at 1024², but XLA's
# temporaries 834 -> 1,034 MiB and 572 -> 696 (ab_in_proj_windows_vim_tiny_h100.txt): x's half stays allocated
# while z is read, through the step projections and both scan launches.
IN_PROJ_WINDOWS = False

CLS_POSITIONS = ("middle", "head")
# x_proj's step part is zero-padded to a multiple of this many columns, or of d_state if larger.
_ALIGNED_RANK = 8


def _padded_rank(rank: int, state: int) -> int:
  """The step's rank as x_proj's output holds it (`BiMambaMixer._direction`)."""
  multiple = max(_ALIGNED_RANK, state)
  return -(-rank // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a Vim model. Defaults are the released Vim-Ti (vim_spec.md §3)."""

  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 16
  stride: int = 16
  in_chans: int = 3
  embed_dim: int = 192
  depth: int = 24
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None  # None = ceil(embed_dim / 16), Mamba's "auto"
  num_classes: int = 1000  # 0 = no head (features only)
  cls_position: Literal["middle", "head"] = "middle"
  divide_out: bool = True  # (y_fwd + y_bwd) / 2, as in every released model
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  # Numerics and kernels.
  dtype: str = "float32"  # compute dtype of matmuls and activations; "bfloat16" on accelerators
  matmul_precision: str | None = None  # e.g. "highest" to avoid TF32 in float32 on GPUs
  # See kernels.selective_scan; None = by backend. The conv + SiLU, (bf16) x_proj and dt_proj and the blocks'
  # add + norm follow it: their Pallas GPU kernels where the scan's are ("pallas_gpu", "pallas", None on GPU), XLA
  # otherwise.
  scan_impl: str | None = None
  scan_interpret: bool = False  # Pallas interpret mode (CPU testing of GPU/TPU kernels)
  remat: bool = False  # recompute each block in the backward pass (memory for long sequences)
  # One lax.scan over the blocks compiles once, not once per layer (H100, Vim-Ti training step: 17 s against
  # 32 s), but the scan stacks every residual: 85 ms and 16.7 GB against 59 ms and 5.2 GB unrolled.
  scan_layers: bool = False

  def __post_init__(self):
    if isinstance(self.img_size, int):
      object.__setattr__(self, "img_size", (self.img_size, self.img_size))
    object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
    if self.cls_position not in CLS_POSITIONS:
      raise ValueError(f"`cls_position` must be one of {CLS_POSITIONS}, got {self.cls_position!r}")
    for name in ("patch_size", "stride", "embed_dim", "depth", "d_state", "d_conv", "expand"):
      if getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
    if min(self.img_size) < self.patch_size:
      raise ValueError(f"`img_size` {self.img_size} is smaller than `patch_size` {self.patch_size}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"`drop_path_rate` must be in [0, 1), got {self.drop_path_rate}")
    jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def d_inner(self) -> int:
    return self.expand * self.embed_dim

  @property
  def resolved_dt_rank(self) -> int:
    return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

  @property
  def grid_size(self) -> tuple[int, int]:
    """Patch grid (rows, cols): (H − p)//s + 1 per side, no padding (official PatchEmbed)."""
    return tuple((s - self.patch_size) // self.stride + 1 for s in self.img_size)

  @property
  def num_patches(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  @property
  def seq_len(self) -> int:
    return self.num_patches + 1

  @property
  def cls_index(self) -> int:
    """Where the cls token sits in the sequence: M//2 for the middle token, 0 at the head."""
    return self.num_patches // 2 if self.cls_position == "middle" else 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
    return cls(**values)


class PatchEmbed(nnx.Module):
  """Conv2d(in_chans, dim, kernel=patch, stride=stride) + row-major flatten; stride 8 = long sequence.

  Non-overlapping patches (stride = patch) run as one matmul over the flattened patches: the same sums,
  but cuDNN's convolution of 3-channel images took 0.38 ms of a Vim-Ti forward at 224² batch 128 on an
  H200, where the matmul's work is a few microseconds."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.patch, self.stride = cfg.patch_size, cfg.stride
    fan_in = cfg.in_chans * cfg.patch_size**2
    self.proj = nnx.Conv(
      cfg.in_chans,
      cfg.embed_dim,
      kernel_size=(cfg.patch_size, cfg.patch_size),
      strides=(cfg.stride, cfg.stride),
      padding="VALID",
      dtype=jnp.dtype(cfg.dtype),
      precision=cfg.matmul_precision,
      kernel_init=layers.lecun_normal_timm_0_4(fan_in),  # segm_init_weights
      bias_init=nnx.initializers.zeros,
      rngs=rngs,
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    if self.stride != self.patch:
      x = self.proj(images)  # (batch, gh, gw, dim)
      return layers.reshape_samples(x, (x.shape[0], -1, x.shape[-1]))
    batch, height, width, chans = images.shape
    p, (gh, gw) = self.patch, (height // self.patch, width // self.patch)
    patches = layers.reshape_samples(images[:, : gh * p, : gw * p], (batch, gh, p, gw, p, chans)).swapaxes(2, 3)
    patches = layers.reshape_samples(patches, (batch, gh * gw, p * p * chans))  # (row, col, channel), as the kernel's
    proj = self.proj
    kernel = proj.kernel[...].reshape(p * p * chans, -1)
    patches, kernel, bias = (x.astype(proj.dtype) for x in (patches, kernel, proj.bias[...]))
    return jnp.dot(patches, kernel, precision=proj.precision) + bias


def _linear(cfg: ModelConfig, d_in: int, d_out: int, *, use_bias: bool, kernel_init, rngs, bias_init=None):
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=use_bias,
    dtype=jnp.dtype(cfg.dtype),
    precision=cfg.matmul_precision,
    kernel_init=kernel_init,
    bias_init=bias_init or nnx.initializers.zeros,
    rngs=rngs,
  )


def _direction_modules(cfg: ModelConfig, *, backward: bool, rngs: nnx.Rngs):
  """conv1d, x_proj, dt_proj, A_log, D of one scan direction (the per-direction half of bimamba v2)."""
  e, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
  conv1d = layers.DepthwiseConv1d(e, cfg.d_conv, rngs=rngs)
  # x_proj: PyTorch Linear default U(±1/sqrt(E)), no bias.
  x_proj = _linear(cfg, e, r + 2 * n, use_bias=False, kernel_init=layers.uniform_symmetric(e**-0.5), rngs=rngs)
  if backward:
    # Official quirk (vim_spec.md §2, §7.4): dt_proj_b is a plain Linear, so its weight keeps the
    # PyTorch default U(±1/sqrt(R)) and `_init_weights` zeroes its bias: softplus(0) = ln 2.
    dt_bias_init = nnx.initializers.zeros
  else:
    # Mamba's dt init: bias = inverse softplus of dt ~ log-uniform[dt_min, dt_max] (`_no_reinit`).
    dt_bias_init = layers.mamba_dt_bias(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
  # Weight U(±R^-0.5): Mamba's "random" dt init (dt_scale 1) forward, the PyTorch default backward.
  dt_proj = _linear(
    cfg, r, e, use_bias=True, kernel_init=layers.uniform_symmetric(r**-0.5), bias_init=dt_bias_init, rngs=rngs
  )
  A_log = nnx.Param(layers.s4d_real_log(n)(None, (e, n)))
  D = nnx.Param(jnp.ones((e,), jnp.float32))
  return conv1d, x_proj, dt_proj, A_log, D


class BiMambaMixer(nnx.Module):
  """Mamba mixer, bimamba v2: shared in/out projections, one conv/x_proj/dt_proj/A/D per direction.

  The backward direction runs on the reversed sequence (both x and the gate z), which here is an
  anti-causal conv plus `selective_scan(..., reverse=True)`: no flipped copies are made.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, e = cfg.embed_dim, cfg.d_inner
    self.in_proj = _linear(cfg, d, 2 * e, use_bias=False, kernel_init=layers.uniform_symmetric(d**-0.5), rngs=rngs)
    # Official names: conv1d/x_proj/dt_proj/A_log/D forward, conv1d_b/x_proj_b/dt_proj_b/A_b_log/D_b backward.
    self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = _direction_modules(cfg, backward=False, rngs=rngs)
    self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = _direction_modules(
      cfg, backward=True, rngs=rngs
    )
    # out_proj: kaiming_uniform(a=√5) = U(±1/√E), rescaled by 1/√depth (`_init_weights`, prenorm rule).
    out_bound = 1.0 / math.sqrt(e * cfg.depth)
    self.out_proj = _linear(cfg, e, d, use_bias=False, kernel_init=layers.uniform_symmetric(out_bound), rngs=rngs)

  def _projections(self, u_f: jax.Array, u_b: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Each direction's (projected, delta): x_proj's output (the step, B and C) and dt_proj's (the step size).

    The step's rank is zero-padded to a multiple of d_state, or of 8 if larger (Vim-Ti's 12 and Vim-S's 24 to
    16 and 32: x_proj's output gets zero columns after the step's, dt_proj's kernel zero rows), which changes
    no value: the matmuls get 16-byte-aligned bf16 rows (Vim-Ti's forward at 224², batch 128, H100: 9.8-9.9
    -> 9.4-9.5 ms, ab_weight_gradients_aligned_rank_vim_tiny_h100.json), and B and C start on whole blocks of
    d_state columns, which the GPU scan reads in place (`Columns`; other impls slice them). Where the mixer's
    GPU kernels run, both directions' four matmuls are one `kernels.step_projections` launch; in XLA, dt_proj
    takes the whole output, with zero rows for B's and C's columns, so the step is not sliced."""
    cfg = self.cfg
    r, n, e, dtype = cfg.resolved_dt_rank, cfg.d_state, cfg.d_inner, jnp.dtype(cfg.dtype)
    rank = _padded_rank(r, n)
    directions = ((self.x_proj, self.dt_proj), (self.x_proj_b, self.dt_proj_b))

    def x_proj_kernel(x_proj):
      kernel = x_proj.kernel[...].astype(dtype)
      return jnp.concatenate([jnp.pad(kernel[:, :r], ((0, 0), (0, rank - r))), kernel[:, r:]], axis=1)

    kernels = conv_silu.uses_kernels(_CONV_IMPLS.get(cfg.scan_impl, "xla"), cfg.scan_interpret)
    if kernels and projections_kernel.supported(e, rank + 2 * n, rank, dtype):
      with jax.named_scope("step_projections"):  # per direction [x_proj | dt_projᵀ], the step's rank padded
        dt_proj_t = [jnp.pad(dt.kernel[...].T.astype(dtype), ((0, 0), (0, rank - r))) for _, dt in directions]
        packed = jnp.stack([jnp.concatenate([x_proj_kernel(x), t], 1) for (x, _), t in zip(directions, dt_proj_t)])
        return layers.step_projections(u_f.astype(dtype), u_b.astype(dtype), packed, rank, cfg.scan_interpret)
    outs = []
    for u, (x_proj, dt_proj), name in zip((u_f, u_b), directions, ("forward", "backward")):
      with jax.named_scope(f"{name}/x_proj"):
        projected = layers.dense(u.astype(dtype), x_proj_kernel(x_proj), cfg.matmul_precision)
      with jax.named_scope(f"{name}/dt_proj"):  # its bias goes to the scan
        kernel = jnp.pad(dt_proj.kernel[...].astype(dtype), ((0, rank - r + 2 * n), (0, 0)))
        outs.append((projected, layers.dense(projected, kernel, cfg.matmul_precision)))
    return outs

  def _direction(self, u, projected, delta, A_log, D, dt_proj) -> Direction:
    """One direction's scan arguments: B and C are windows of x_proj's output (`_projections`), A = -exp(A_log)
    is left to the scan (the GPU kernel computes it: no launch of its own)."""
    rank, n = _padded_rank(self.cfg.resolved_dt_rank, self.cfg.d_state), self.cfg.d_state
    B, C = Columns(projected, rank, n), Columns(projected, rank + n, n)
    return Direction(u, delta, NegativeExp(A_log[...]), B, C, D[...], dt_proj.bias[...])

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """hidden: (batch, length, dim) normed tokens -> (batch, length, dim)."""
    return self.project_out(self.mix(*self.project_in(hidden)))

  def project_in(self, hidden: jax.Array) -> tuple[jax.Array | Columns, jax.Array | Columns]:
    """in_proj's halves x and z, (batch, length, d_inner) each: windows of one output where the conv and scan
    kernels run (`IN_PROJ_WINDOWS`), else each written contiguous."""
    cfg = self.cfg
    with jax.named_scope("in_proj"):
      hidden, weight = hidden.astype(cfg.dtype), self.in_proj_weight()
      if IN_PROJ_WINDOWS and conv_silu.uses_kernels(_CONV_IMPLS.get(cfg.scan_impl, "xla"), cfg.scan_interpret):
        return layers.matmul_windows(hidden, weight, cfg.matmul_precision)
      return layers.matmul_halves(hidden, weight, cfg.matmul_precision)

  def project_out(self, mixed: jax.Array) -> jax.Array:
    """out_proj: (batch, length, d_inner) `mix` output -> (batch, length, dim)."""
    with jax.named_scope("out_proj"):
      return layers.dense(mixed, self.out_proj_weight(), self.cfg.matmul_precision)

  def in_proj_weight(self) -> jax.Array:
    return self.in_proj.kernel[...].astype(self.cfg.dtype)

  def out_proj_weight(self) -> jax.Array:
    return self.out_proj.kernel[...].astype(self.cfg.dtype)

  def mix(self, x: jax.Array | Columns, z: jax.Array | Columns) -> jax.Array:
    """The mixer between its projections: x and z (batch, length, d_inner), in_proj's halves (arrays or `Columns`
    windows) -> the gated scan output (batch, length, d_inner) in the compute dtype, out_proj's input."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    with jax.named_scope("conv_silu"):  # both directions in one pass over x; a pair each for the scan and the
      # projections, whose gradients the conv's backward then adds as it reads them (no add of its own in XLA)
      u_f, u_b, u_f_projected, u_b_projected = conv_silu_bidirectional(
        x,
        (self.conv1d.kernel[...], self.conv1d.bias[...]),
        (self.conv1d_b.kernel[...], self.conv1d_b.bias[...]),
        impl=_CONV_IMPLS.get(cfg.scan_impl, "xla"),
        interpret=cfg.scan_interpret,
        consumers=2,
      )
    (projected_f, delta_f), (projected_b, delta_b) = self._projections(u_f_projected, u_b_projected)
    with jax.named_scope("forward"):
      forward = self._direction(u_f, projected_f, delta_f, self.A_log, self.D, self.dt_proj)
    with jax.named_scope("backward"):
      backward = self._direction(u_b, projected_b, delta_b, self.A_b_log, self.D_b, self.dt_proj_b)
    with jax.named_scope("scan"):
      y = selective_scan_bidirectional(
        forward,
        backward,
        z,
        delta_softplus=True,
        divide_out=cfg.divide_out,
        impl=cfg.scan_impl,
        interpret=cfg.scan_interpret,
      )
    return y.astype(dtype)


class Block(nnx.Module):
  """Add -> RMSNorm -> mixer, as the official Block: the previous mixer's output joins the float32 residual stream
  at the block's start, in one pass with the norm (`RMSNorm.add`, mamba_ssm's fused add + norm). Undifferentiated and
  at few rows (`add_norm.project_pays`), that pass also runs the mixer's in_proj (`layers.add_norm_in_proj`).

  The stream between blocks is (residual, hidden): the residual before `hidden`, the last mixer's output in the
  compute dtype, is added. At many rows (`projects_between_blocks`) it is (residual, mixed, out_proj): the last
  mixer's output before its out_proj, and that out_proj's weight, which the next block's add + norm applies in the
  same pass (`layers.projected_add_norm`). Drop path scales each mixer's output with that mixer's rate before it is
  passed on (the official code applies block i's rate to the incoming output of mixer i - 1 with a shifted rate
  list: the same computation, vim_spec.md §1.4; a per-sample scale commutes with out_proj).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
    self.mixer = BiMambaMixer(cfg, rngs=rngs)
    self.dtype = jnp.dtype(cfg.dtype)
    self.add_norm_kernel = uses_add_norm_kernel(cfg)
    self.fused_in_proj = self.add_norm_kernel and add_norm.project_supported(cfg.embed_dim, cfg.d_inner, cfg.dtype)
    self.interpret = cfg.scan_interpret

  def __call__(
    self,
    stream: tuple[jax.Array, ...],
    *,
    drop_rate: float | jax.Array = 0.0,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, ...]:
    """The stream after this block, in the structure it came in (class docstring). `drop_rate` is an argument, not
    an attribute, so that all blocks share one structure (layer scan)."""
    norm, mixer = self.norm, self.mixer
    precision = mixer.cfg.matmul_precision
    residual, hidden, *out_proj = stream
    if out_proj:
      with jax.named_scope("out_proj_add_norm"):
        residual, normed = layers.projected_add_norm(
          residual, hidden, *out_proj, norm.weight[...], eps=norm.eps, precision=precision, interpret=self.interpret
        )
      mixed = mixer.mix(*mixer.project_in(normed))
      return residual, layers.drop_path(mixed, drop_rate, rngs), mixer.out_proj_weight()
    if self.fused_in_proj and add_norm.project_pays(residual.size // residual.shape[-1]):
      with jax.named_scope("add_norm_in_proj"):
        residual, x, z = layers.add_norm_in_proj(
          residual,
          hidden,
          norm.weight[...],
          mixer.in_proj_weight(),
          eps=norm.eps,
          precision=precision,
          interpret=self.interpret,
        )
      return residual, layers.drop_path(mixer.project_out(mixer.mix(x, z)), drop_rate, rngs)
    with jax.named_scope("add_norm"):
      residual, normed = norm.add(
        residual, hidden, dtype=self.dtype, kernel=self.add_norm_kernel, interpret=self.interpret
      )
    return residual, layers.drop_path(mixer(normed), drop_rate, rngs)


def projects_between_blocks(cfg: ModelConfig, rows: int) -> bool:
  """Whether the blocks pass on their mixer's output before out_proj, for the next block's add + norm to apply it
  (`Block`): where the add + norm kernel runs, `add_norm.projected_add_norm` takes the shapes, and at the rows
  (all of a call's, batch · tokens) where it pays (`add_norm.projected_pays`)."""
  return (
    uses_add_norm_kernel(cfg)
    and add_norm.projected_supported(cfg.d_inner, cfg.embed_dim, cfg.dtype)
    and add_norm.projected_pays(rows)
  )


def uses_add_norm_kernel(cfg: ModelConfig) -> bool:
  """Whether the blocks' add + norm runs `kernels.add_norm`'s kernel: where the mixer's other kernels run."""
  kernels = conv_silu.uses_kernels(_CONV_IMPLS.get(cfg.scan_impl, "xla"), cfg.scan_interpret)
  return kernels and add_norm.supported(cfg.embed_dim)


class VisionMamba(nnx.Module):
  """The Vim backbone and classifier. `model(images)` takes NHWC images and returns logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(layers.trunc_normal(0.02)(rngs.params(), (1, 1, d)))
    self.pos_embed = nnx.Param(layers.trunc_normal(0.02)(rngs.params(), (1, cfg.seq_len, d)))
    # Linear drop-path rule: mixer j's output is dropped with probability rate · j / (depth − 1).
    self.drop_path_rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depth)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm_f = layers.RMSNorm(d, eps=cfg.norm_eps)
    if cfg.num_classes > 0:
      self.head = _linear(cfg, d, cfg.num_classes, use_bias=True, kernel_init=layers.trunc_normal(0.02), rngs=rngs)
    else:
      self.head = None

  def _check_images(self, images: jax.Array) -> None:
    cfg = self.cfg
    expected = (*cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
        f"`images` must be NHWC with shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) for this "
        f"model (img_size={cfg.img_size}, in_chans={cfg.in_chans}), got {tuple(images.shape)}; build the "
        "model for another size with create_model(..., img_size=...) or resize the position embedding"
      )
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"`images` must be a floating-point array, got dtype {images.dtype}")

  def embed(self, images: jax.Array) -> jax.Array:
    """Patch tokens with the cls token inserted at `cfg.cls_index`, plus the position embedding (f32)."""
    self._check_images(images)
    cfg = self.cfg
    x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype))).astype(jnp.float32)
    cls = layers.sharded_as(jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])), x)
    i = cfg.cls_index
    x = jnp.concatenate([x[:, :i], cls, x[:, i:]], axis=1)
    return x + self.pos_embed[...]

  def _stream(self, images: jax.Array, rngs: nnx.Rngs | None) -> tuple[jax.Array, ...]:
    """The stream after the last block (`Block`): the float32 residual stream before the last mixer's output is
    added, that output, and, where the blocks pass it on before out_proj, out_proj's weight. The first block adds
    zeros."""
    cfg = self.cfg
    x = self.embed(images)
    if projects_between_blocks(cfg, x.shape[0] * x.shape[1]):
      stream = (x, jnp.zeros((*x.shape[:-1], cfg.d_inner), cfg.dtype), jnp.zeros((cfg.d_inner, x.shape[-1]), cfg.dtype))
    else:
      stream = (x, jnp.zeros_like(x, dtype=cfg.dtype))
    return layers.apply_blocks(
      self.layers, stream, rngs, rates=self.drop_path_rates, scan=cfg.scan_layers, remat=cfg.remat
    )

  def _last_sum_parts(self, stream: tuple[jax.Array, ...], at=...) -> tuple[jax.Array, jax.Array]:
    """(residual, the last mixer's output) at the token index `at` of the final stream, out_proj applied if the
    stream carries it."""
    residual, hidden, *out_proj = stream
    residual, hidden = residual[at], hidden[at]
    if out_proj:
      hidden = layers.dense(hidden, *out_proj, self.cfg.matmul_precision)
    return residual, hidden

  def forward_tokens(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The final-normed token sequence (batch, length, dim), cls included: the dense-prediction output."""
    residual, hidden = self._last_sum_parts(self._stream(images, rngs))
    return self.norm_f.add(
      residual, hidden, dtype=jnp.float32, kernel=uses_add_norm_kernel(self.cfg), interpret=self.cfg.scan_interpret
    )[1]

  def forward_features(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The pre-head feature (batch, dim): the final cls token. Only its row of the last sum is computed (every
    earlier sum is written whole by the blocks)."""
    residual, hidden = self._last_sum_parts(self._stream(images, rngs), at=(slice(None), self.cfg.cls_index))
    return self.norm_f(residual + hidden.astype(jnp.float32))

  def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits (batch, num_classes) in float32; drop path is active only when `rngs` is given."""
    features = self.forward_features(images, rngs=rngs)
    if self.head is None:
      return features
    return self.head(features.astype(jnp.dtype(self.cfg.dtype))).astype(jnp.float32)
