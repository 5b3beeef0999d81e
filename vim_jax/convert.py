"""Convert between official PyTorch Vim checkpoints and vim_jax model directories.

  python -m vim_jax.convert SRC.pth OUT_DIR [--img-size 224] [--stride 8] [--use-ema] [--num-classes N]
  python -m vim_jax.convert --to-pytorch MODEL_DIR DST.pth

The first writes an orbax model directory (params + config.json) that `vim_jax.load_model` and the
trainer start from; the second writes `{'model': state_dict}` for the official code / `torch.load`.
"""

from __future__ import annotations

import argparse
import sys

from vim_jax import checkpointing, official


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m vim_jax.convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("src", help="official .pth file (or, with --to-pytorch, a vim_jax model directory)")
  parser.add_argument("dst", help="output model directory (or, with --to-pytorch, the .pth file to write)")
  parser.add_argument("--to-pytorch", action="store_true", help="convert a vim_jax model directory to .pth")
  parser.add_argument("--img-size", type=int, default=224, help="image size the converted model takes")
  parser.add_argument("--stride", type=int, default=None, help="patch stride (inferred when unambiguous)")
  parser.add_argument("--use-ema", action="store_true", help="take the EMA weights (model_ema)")
  parser.add_argument("--num-classes", type=int, default=None, help="replace the head (0 removes it)")
  parser.add_argument(
    "--official-pos-embed-quirk", action="store_true", help="resize pos_embed like the official fine-tuning"
  )
  parser.add_argument("--force", action="store_true", help="overwrite an existing output")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.to_pytorch:
    model = checkpointing.load_model(args.src)
    official.save_official(model, args.dst)
  else:
    model = official.load_official(
      args.src,
      img_size=args.img_size,
      stride=args.stride,
      use_ema=args.use_ema,
      num_classes=args.num_classes,
      pos_embed_quirk=args.official_pos_embed_quirk,
    )
    checkpointing.save_model(model, args.dst, force=args.force)
  cfg = model.cfg
  print(
    f"wrote {args.dst}: depth {cfg.depth}, dim {cfg.embed_dim}, stride {cfg.stride}, img {cfg.img_size}, "
    f"{cfg.num_classes} classes"
  )
  return 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
