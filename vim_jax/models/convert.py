"""Official PyTorch state_dict <-> our NNX parameters: a naming table plus three layout rules.

Our attribute paths equal the official module paths, so `layers.3.mixer.x_proj_b.kernel` is
`layers.3.mixer.x_proj_b.weight` transposed. Layouts (vim_spec.md §4.1):
- Linear weight (out, in)              <-> Dense kernel (in, out)
- Conv2d weight (out, in, kh, kw)      <-> Conv kernel (kh, kw, in, out)
- depthwise Conv1d weight (E, 1, K)    <-> DepthwiseConv1d kernel (K, E)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from vim_jax.models import layers
from vim_jax.models.vim import ModelConfig, VisionMamba

log = logging.getLogger(__name__)

_CONV1D_KERNELS = ("conv1d.kernel", "conv1d_b.kernel")
_PATCH_KERNEL = "patch_embed.proj.kernel"


def _torch_name(path: str) -> str:
  return path[: -len("kernel")] + "weight" if path.endswith(".kernel") else path


def _to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith(_CONV1D_KERNELS):
    return np.ascontiguousarray(value.T[:, None, :])
  if path == _PATCH_KERNEL:
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if path.endswith(".kernel"):
    return np.ascontiguousarray(value.T)
  return value


def _from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith(_CONV1D_KERNELS):
    return np.ascontiguousarray(value[:, 0, :].T)
  if path == _PATCH_KERNEL:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if path.endswith(".kernel"):
    return np.ascontiguousarray(value.T)
  return value


def _flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Our parameters by dotted path, e.g. 'layers.0.mixer.in_proj.kernel'."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(str(k) for k in path): variable for path, variable in flat}


def to_official_state_dict(model: VisionMamba) -> dict[str, np.ndarray]:
  """Our parameters as an official `VisionMamba.state_dict()` (numpy, float32, PyTorch layouts)."""
  return {
    _torch_name(path): _to_torch_layout(path, np.asarray(jax.device_get(variable[...])))
    for path, variable in _flat_params(model).items()
  }


def from_official_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> VisionMamba:
  """A VisionMamba with `cfg`'s architecture holding the given official weights.

  Every problem (missing key, unexpected key, wrong shape) is reported at once in one error.
  """
  abstract = nnx.eval_shape(lambda: VisionMamba(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = _flat_params(abstract)
  problems, values = [], {}
  for path, variable in expected.items():
    name = _torch_name(path)
    if name not in state_dict:
      problems.append(f"missing key {name!r}")
      continue
    value = _from_torch_layout(path, np.asarray(state_dict[name]))
    if value.shape != variable.shape:
      want = _to_torch_layout(path, np.zeros(variable.shape, np.float32)).shape
      problems.append(f"{name!r} has shape {tuple(np.shape(state_dict[name]))}, expected {want}")
      continue
    values[path] = value.astype(variable.dtype)
  unexpected = sorted(set(state_dict) - {_torch_name(p) for p in expected})
  problems += [f"unexpected key {name!r}" for name in unexpected]
  if problems:
    raise ValueError(f"state_dict does not fit a Vim model with {cfg}:\n  " + "\n  ".join(problems))
  for path, variable in nnx.to_flat_state(state):
    variable.set_value(values[".".join(str(k) for k in path)])
  return nnx.merge(graphdef, state)


def infer_config(
  state_dict: Mapping[str, np.ndarray],
  *,
  img_size: int | tuple[int, int] = 224,
  stride: int | None = None,
  **overrides,
) -> tuple[ModelConfig, tuple[int, int]]:
  """The architecture an official state_dict holds, and the patch grid its pos_embed was made for.

  Depth, width, d_state, dt_rank, d_conv, classes and patch size come from tensor shapes. The stride
  comes from the number of patches and `img_size` where exactly one stride tiles the image into that
  many patches; otherwise pass `stride`. When `stride` is given and its grid differs from the
  checkpoint's, the returned checkpoint grid (assumed square) tells the caller to resize pos_embed.
  """
  required = ("pos_embed", "patch_embed.proj.weight", "layers.0.mixer.A_log", "layers.0.mixer.in_proj.weight")
  missing = [k for k in required if k not in state_dict]
  if missing:
    raise ValueError(f"not a Vim state_dict: missing {missing} (found e.g. {sorted(state_dict)[:5]})")
  embed_dim = int(state_dict["pos_embed"].shape[-1])
  patch_w = state_dict["patch_embed.proj.weight"]
  patch_size, in_chans = int(patch_w.shape[-1]), int(patch_w.shape[1])
  depth = sum(1 for k in state_dict if k.startswith("layers.") and k.endswith(".norm.weight"))
  d_inner, d_state = (int(n) for n in state_dict["layers.0.mixer.A_log"].shape)
  dt_rank = int(state_dict["layers.0.mixer.dt_proj.weight"].shape[1])
  d_conv = int(state_dict["layers.0.mixer.conv1d.weight"].shape[-1])
  num_classes = int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0
  num_patches = int(state_dict["pos_embed"].shape[1]) - 1
  img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

  def grid(s: int) -> tuple[int, int]:
    return tuple((side - patch_size) // s + 1 for side in img_hw)

  if stride is None:
    candidates = [
      s
      for s in range(1, patch_size + 1)
      if all((side - patch_size) % s == 0 for side in img_hw) and math.prod(grid(s)) == num_patches
    ]
    if len(candidates) != 1:
      found = "none does" if not candidates else f"strides {candidates} all do"
      raise ValueError(
        f"cannot infer the patch stride: the checkpoint has {num_patches} patch tokens and at "
        f"img_size={img_hw}, patch {patch_size}, {found}; pass stride= (and img_size= the size the "
        "checkpoint was trained at, e.g. 224)"
      )
    stride = candidates[0]
  checkpoint_grid = grid(stride)
  if math.prod(checkpoint_grid) != num_patches:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ValueError(f"pos_embed holds {num_patches} patches, not a square grid; cannot resize it")
    checkpoint_grid = (side, side)
  cfg = ModelConfig(
    img_size=img_hw,
    patch_size=patch_size,
    stride=stride,
    in_chans=in_chans,
    embed_dim=embed_dim,
    depth=depth,
    d_state=d_state,
    d_conv=d_conv,
    expand=d_inner // embed_dim,
    dt_rank=dt_rank,
    num_classes=num_classes,
    **overrides,
  )
  return cfg, checkpoint_grid


def adapt_state_dict(
  state_dict: Mapping[str, np.ndarray],
  cfg: ModelConfig,
  checkpoint_grid: tuple[int, int],
  *,
  official_quirk: bool = False,
) -> dict[str, np.ndarray]:
  """Resize pos_embed from the checkpoint's patch grid to `cfg`'s (no-op when they match)."""
  state_dict = dict(state_dict)
  if checkpoint_grid != cfg.grid_size:
    log.info(
      "resizing pos_embed from grid %s to %s (official_quirk=%s)", checkpoint_grid, cfg.grid_size, official_quirk
    )
    state_dict["pos_embed"] = layers.resize_pos_embed(
      np.asarray(state_dict["pos_embed"]), checkpoint_grid, cfg.grid_size, official_quirk=official_quirk
    )
  return state_dict
