r"""Evaluate a checkpoint on the validation split: top-1, top-5 and loss.

  python -m vim_jax.evaluate --config=configs/tiny.py --checkpoint=runs/vim_tiny/best
  python -m vim_jax.evaluate --config=configs/tiny.py --checkpoint=vim_t_midclstok_76p1acc.pth [--use_ema]

The checkpoint is a vim_jax model directory (`runs/*/best`, `vim_jax.convert` output) or an official
`.pth` file (loaded with `vim_jax.load_official`, without torch). The data comes from the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from vim_jax import checkpointing, logs, official, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A vim_jax model directory or an official .pth file.")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "For .pth files: evaluate the EMA weights (model_ema).")
flags.mark_flags_as_required(["config", "checkpoint"])


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, *, use_ema: bool = False) -> dict:
  """Metrics of `checkpoint` on `config`'s eval split, sharded over all devices like training."""
  exp = trainer.Experiment.create(config)
  cfg = exp.model_cfg
  if Path(checkpoint).suffix == ".pth":
    model = official.load_official(
      checkpoint, img_size=cfg.img_size, stride=cfg.stride, use_ema=use_ema, dtype=cfg.dtype, scan_impl=cfg.scan_impl
    )
  else:
    model = checkpointing.load_model(checkpoint, dtype=cfg.dtype, scan_impl=cfg.scan_impl)
  trainer.check_architecture(model.cfg, cfg, f"`checkpoint` {checkpoint}")
  with jax.set_mesh(exp.mesh):
    params = jax.device_put(nnx.state(model, nnx.Param), exp.state_sharding["params"])
    _, eval_step = exp.jitted()
    return trainer.evaluate(exp, eval_step, params, config)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  print(json.dumps(evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, use_ema=_USE_EMA.value)))


if __name__ == "__main__":
  app.run(main)
