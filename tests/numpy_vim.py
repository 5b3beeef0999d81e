"""An independent float64 NumPy implementation of the official Vim forward pass (vim_spec.md §1).

It works on the official state_dict in PyTorch layouts and in the official channel-major mixer
layout, flipping arrays for the backward direction exactly as the official code does, so it shares
no code or layout trick with vim_jax. It is checked against the official float64 logits and then
serves as a second ground truth (EMA weights, other cls positions and strides).
"""

from __future__ import annotations

import numpy as np


def _softplus(x):
  return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _silu(x):
  return x / (1 + np.exp(-x))


def _rms_norm(x, weight, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _causal_conv(x, weight, bias):
  """x (b, e, l), weight (e, 1, k): F.conv1d(padding=k-1, groups=e)[..., :l]."""
  k, length = weight.shape[-1], x.shape[-1]
  xp = np.pad(x, ((0, 0), (0, 0), (k - 1, 0)))
  return bias[None, :, None] + sum(weight[None, :, 0, j, None] * xp[:, :, j : j + length] for j in range(k))


def _scan(u, delta, A, B, C, D, z, delta_bias):
  """selective_scan_ref, channel-major: u, delta, z (b, e, l); B, C (b, n, l)."""
  delta = _softplus(delta + delta_bias[None, :, None])
  b, e, length = u.shape
  h = np.zeros((b, e, A.shape[1]))
  ys = []
  for t in range(length):
    h = np.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
    ys.append(np.einsum("ben,bn->be", h, C[:, :, t]))
  y = np.stack(ys, axis=-1) + D[None, :, None] * u
  return y * _silu(z)


def _direction(xz, p, backward):
  """One direction on channel-major xz (b, 2e, l); the backward one gets xz flipped, like the official code."""
  sfx = "_b" if backward else ""
  dt_rank, d_state = p["dt_proj.weight"].shape[1], p["A_log"].shape[1]
  e = xz.shape[1] // 2
  x, z = xz[:, :e], xz[:, e:]
  u = _silu(_causal_conv(x, p[f"conv1d{sfx}.weight"], p[f"conv1d{sfx}.bias"]))
  x_dbl = np.einsum("bel,re->blr", u, p[f"x_proj{sfx}.weight"])
  dt, B, C = np.split(x_dbl, [dt_rank, dt_rank + d_state], axis=-1)
  delta = np.einsum("blr,er->bel", dt, p[f"dt_proj{sfx}.weight"])
  A = -np.exp(p["A_b_log" if backward else "A_log"])
  return _scan(u, delta, A, B.transpose(0, 2, 1), C.transpose(0, 2, 1), p[f"D{sfx}"], z, p[f"dt_proj{sfx}.bias"])


def mixer(hidden, p):
  """bimamba v2 on (b, l, d) tokens; `p` holds the `layers.i.mixer.` weights without that prefix."""
  xz = np.einsum("bld,fd->bfl", hidden, p["in_proj.weight"])
  y = (_direction(xz, p, False) + _direction(xz[..., ::-1], p, True)[..., ::-1]) / 2
  return np.einsum("bel,de->bld", y, p["out_proj.weight"])


def forward(state_dict, images_nchw, *, stride=16, cls_index=None):
  """Logits of the official model in float64; `cls_index` None = middle (M // 2)."""
  sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
  x = images_nchw.astype(np.float64)
  w = sd["patch_embed.proj.weight"]
  p = w.shape[-1]
  gh, gw = (x.shape[2] - p) // stride + 1, (x.shape[3] - p) // stride + 1
  patches = np.stack(
    [x[:, :, i * stride : i * stride + p, j * stride : j * stride + p] for i in range(gh) for j in range(gw)],
    axis=1,
  )  # (b, m, c, p, p), row-major over the grid
  tokens = np.einsum("bmcij,dcij->bmd", patches, w) + sd["patch_embed.proj.bias"]
  m = tokens.shape[1]
  i = m // 2 if cls_index is None else cls_index
  cls = np.broadcast_to(sd["cls_token"], (tokens.shape[0], 1, tokens.shape[2]))
  residual = np.concatenate([tokens[:, :i], cls, tokens[:, i:]], axis=1) + sd["pos_embed"]
  depth = sum(1 for k in sd if k.endswith(".norm.weight"))
  for layer in range(depth):
    prefix = f"layers.{layer}."
    hidden = mixer(
      _rms_norm(residual, sd[prefix + "norm.weight"]),
      {k[len(prefix + "mixer.") :]: v for k, v in sd.items() if k.startswith(prefix + "mixer.")},
    )
    residual = residual + hidden
  features = _rms_norm(residual, sd["norm_f.weight"])[:, i]
  return features @ sd["head.weight"].T + sd["head.bias"]
