"""Our own model checkpoints: orbax-written parameters plus the ModelConfig as JSON.

Layout of a model directory:
  config.json   ModelConfig fields
  params/       orbax StandardCheckpointer tree of the nnx.Param state (atomic: written to a
                temporary folder and renamed when complete)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from vim_jax.models.vim import ModelConfig, VisionMamba

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: VisionMamba, directory: str | os.PathLike, *, force: bool = False) -> Path:
  """Save `model` to `directory` (created); refuses to overwrite unless `force`."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, nnx.state(model, nnx.Param), force=force)
  checkpointer.wait_until_finished()
  tmp = directory / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
  os.replace(tmp, directory / CONFIG_FILE)
  return directory


def load_config(directory: str | os.PathLike) -> ModelConfig:
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is '{directory}' a directory written by vim_jax.save_model?")
  return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(directory: str | os.PathLike, **overrides) -> VisionMamba:
  """Restore a model saved by `save_model`; `overrides` change numerics fields (dtype, scan_impl, ...)."""
  directory = Path(directory).absolute()
  cfg = load_config(directory)
  if overrides:
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
  abstract = nnx.eval_shape(lambda: VisionMamba(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract_state)
  return nnx.merge(graphdef, state)
