"""Load the released PyTorch Vim checkpoints, and write ours back in their format. No torch needed.

The released `.pth` files are the whole dict the official `main.py` saves (`model`, `model_ema`,
`optimizer`, `args` as an argparse Namespace, ...). `vim_jax.pth` reads them without executing any
code from the file; this module picks the weights, infers the architecture and builds the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

from vim_jax import pth
from vim_jax.models import convert, layers
from vim_jax.models.vim import VisionMamba


def official_state_dict(checkpoint: Mapping, *, use_ema: bool = False, source: str = "checkpoint") -> dict:
  """The model weights of an official checkpoint dict: `model` (or `model_ema`), or a bare state_dict."""
  key = "model_ema" if use_ema else "model"
  if key in checkpoint:
    return dict(checkpoint[key])
  if "pos_embed" in checkpoint and not use_ema:
    return dict(checkpoint)
  raise ValueError(
    f"{source} has no {key!r} entry (top-level keys: {sorted(map(str, checkpoint))}); "
    + ("use_ema=True needs a full training checkpoint" if use_ema else "expected an official Vim checkpoint")
  )


def _replace_head(state_dict: dict, num_classes: int, seed: int) -> dict:
  """Drop the checkpoint's head; a new one (trunc_normal 0.02, zero bias) when num_classes > 0."""
  state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
  if num_classes > 0:
    dim = int(state_dict["pos_embed"].shape[-1])
    kernel = layers.trunc_normal(0.02)(jax.random.key(seed), (dim, num_classes))
    state_dict["head.weight"] = np.asarray(kernel).T
    state_dict["head.bias"] = np.zeros((num_classes,), np.float32)
  return state_dict


def load_official(
  path: str | os.PathLike,
  *,
  img_size: int | tuple[int, int] = 224,
  stride: int | None = None,
  use_ema: bool = False,
  num_classes: int | None = None,
  pos_embed_quirk: bool = False,
  head_seed: int = 0,
  **overrides,
) -> VisionMamba:
  """A ready VisionMamba from an official `.pth` file (released weights or `checkpoint_full.pth`).

  Args:
    path: the `.pth` file.
    img_size: the image size the model will take. With a different size than the checkpoint's (and
      `stride` given), pos_embed is resized bicubically over the patch grid, cls slot kept.
    stride: patch stride; inferred from the number of patches when unambiguous.
    use_ema: take `model_ema` instead of `model`.
    num_classes: None keeps the checkpoint's head; another count replaces it with a fresh head
      (seeded by `head_seed`), 0 removes it (the model then returns features).
    pos_embed_quirk: resize pos_embed the way the official fine-tuning code does (vim_spec.md §1.3).
    **overrides: other ModelConfig fields, e.g. dtype="bfloat16", scan_impl="xla".
  """
  checkpoint = pth.read_pth(path)
  state_dict = official_state_dict(checkpoint, use_ema=use_ema, source=f"'{os.fspath(path)}'")
  cfg, checkpoint_grid = convert.infer_config(state_dict, img_size=img_size, stride=stride, **overrides)
  if num_classes is not None and num_classes != cfg.num_classes:
    state_dict = _replace_head(state_dict, num_classes, head_seed)
    cfg, checkpoint_grid = convert.infer_config(state_dict, img_size=img_size, stride=cfg.stride, **overrides)
  state_dict = convert.adapt_state_dict(state_dict, cfg, checkpoint_grid, official_quirk=pos_embed_quirk)
  return convert.from_official_state_dict(state_dict, cfg)


def save_official(model: VisionMamba, path: str | os.PathLike) -> None:
  """Write `{'model': state_dict}` as a `.pth` file that the official code and `torch.load` read."""
  pth.write_pth(path, {"model": convert.to_official_state_dict(model)})
