"""Offline demo: load an official-format Vim checkpoint without torch, predict, and check the logits.

  python -m vim_jax.official_demo [--checkpoint PATH.pth] [--img-size 64]

By default it uses the small reference Vim shipped in tests/data (made by the official PyTorch code,
in the layout of the released files: model, model_ema, optimizer and an argparse Namespace), runs both
scan implementations, compares with the official float64 logits, and round-trips the weights through
an orbax model directory and a `.pth` file. With `--checkpoint` it loads a released file instead
(e.g. vim_t_midclstok_76p1acc.pth) and reports its architecture and a timed forward pass.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import vim_jax
from vim_jax.models import convert

REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "vim_small_midcls"


def _forward(model: vim_jax.VisionMamba, images: jax.Array) -> tuple[np.ndarray, float]:
  """Logits and the steady-state time of one jitted forward (seconds)."""
  apply = nnx.jit(lambda m, x: m(x))
  jax.block_until_ready(apply(model, images))
  start = time.perf_counter()
  logits = jax.block_until_ready(apply(model, images))
  return np.asarray(logits), time.perf_counter() - start


def _reference_demo() -> None:
  checkpoint = REFERENCE / "checkpoint_full.pth"
  if not checkpoint.is_file():
    raise SystemExit(f"reference checkpoint {checkpoint} not found: run the demo from a vim_jax checkout")
  images = jnp.asarray(np.load(REFERENCE / "inputs.npy").transpose(0, 2, 3, 1))
  official = np.load(REFERENCE / "logits_float64.npy")
  print(
    f"checkpoint   {checkpoint.relative_to(REFERENCE.parents[2])} (full official training dict, read without torch)"
  )
  for impl in ("reference", "xla"):
    model = vim_jax.load_official(checkpoint, img_size=64, scan_impl=impl)
    logits, seconds = _forward(model, images)
    err = np.abs(logits - official).max() / np.abs(official).max()
    print(f"scan={impl:<10} logits vs official float64: max rel. error {err:.1e}   forward {seconds * 1e3:.1f} ms")
  cfg = model.cfg
  layout = f"depth {cfg.depth}, dim {cfg.embed_dim}, stride {cfg.stride}, {cfg.seq_len} tokens"
  print(f"model        {layout}, cls at {cfg.cls_index}")
  print(f"predictions  {logits.argmax(-1).tolist()} (official: {official.argmax(-1).tolist()})")
  ema = vim_jax.load_official(checkpoint, img_size=64, use_ema=True)
  print(f"EMA weights  predictions {_forward(ema, images)[0].argmax(-1).tolist()}")
  with tempfile.TemporaryDirectory() as tmp:
    vim_jax.save_model(model, pathlib.Path(tmp) / "vim")
    restored = vim_jax.load_model(pathlib.Path(tmp) / "vim")
    vim_jax.save_official(restored, pathlib.Path(tmp) / "back.pth")
    back = vim_jax.load_official(pathlib.Path(tmp) / "back.pth", img_size=64)
    same = all(
      np.array_equal(a, b)
      for a, b in zip(convert.to_official_state_dict(model).values(), convert.to_official_state_dict(back).values())
    )
  print(f"round trip   .pth -> orbax -> .pth: weights {'identical' if same else 'DIFFER'}")


def _checkpoint_demo(path: str, img_size: int, stride: int | None) -> None:
  model = vim_jax.load_official(path, img_size=img_size, stride=stride)
  cfg = model.cfg
  params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  print(f"{path}: depth {cfg.depth}, dim {cfg.embed_dim}, stride {cfg.stride}, {params:,} parameters")
  images = jax.random.normal(jax.random.key(0), (8, *cfg.img_size, cfg.in_chans))
  logits, seconds = _forward(model, images)
  print(f"forward of 8 random images on {jax.devices()[0].platform}: {seconds * 1e3:.1f} ms; logits {logits.shape}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m vim_jax.official_demo", description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", help="an official .pth file (default: the shipped reference model)")
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--stride", type=int, default=None)
  args = parser.parse_args(argv)
  print(f"vim_jax on {jax.devices()[0].platform} (jax {jax.__version__})")
  if args.checkpoint:
    _checkpoint_demo(args.checkpoint, args.img_size, args.stride)
  else:
    _reference_demo()


if __name__ == "__main__":
  main()
