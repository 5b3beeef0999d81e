"""Checkpoints: model directories (params + config) and the trainer's resumable checkpoints.

A model directory (what `vim_jax.convert` writes and `load_model` reads):
  config.json   ModelConfig fields
  params/       orbax StandardCheckpointer tree of the nnx.Param state (atomic: written to a
                temporary folder and renamed when complete)

A training workdir's `checkpoints/<step>/` (orbax CheckpointManager, async, atomic, last N kept):
  state/        params, optimizer state, EMA, step, rng (restored straight into their shardings)
  data/         the input iterator's state (grain), so a resume continues with the next batch
and `best/`, the model directory of the best evaluation so far, with `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from vim_jax.models.vim import ModelConfig, VisionMamba

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: VisionMamba, directory: str | os.PathLike, *, force: bool = False) -> Path:
  """Save `model` to `directory` (created); refuses to overwrite unless `force`."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, nnx.state(model, nnx.Param), force=force)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    _write_json_atomically(directory / CONFIG_FILE, model.cfg.to_dict())
  return directory


def _write_json_atomically(path: Path, values: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(values, indent=2) + "\n")
  os.replace(tmp, path)


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


class TrainCheckpointer:
  """Resumable training checkpoints in `directory`, plus the best model next to it (`../best`)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    self.directory = Path(directory).absolute()
    self.best_dir = self.directory.parent / "best"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def save(self, step: int, state: Any, data_iterator) -> None:
    """Starts an async save of `state` and the iterator position; returns while it is written."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, state: Any, data_iterator) -> tuple[Any, int]:
    """(restored state, step) from the newest checkpoint, or (state, 0) when there is none.

    `state` gives the structure and shardings to restore into; the iterator is restored in place.
    """
    step = self._manager.latest_step()
    if step is None:
      return state, 0
    log.info("restoring checkpoint %s/%d", self.directory, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iterator)
      ),
    )
    return restored.state, step

  def save_best(self, model: VisionMamba, step: int, metrics: dict[str, float]) -> None:
    save_model(model, self.best_dir, force=True)
    if jax.process_index() == 0:
      _write_json_atomically(self.best_dir / "metrics.json", {"step": step, **metrics})

  def best_metric(self, name: str = "top1") -> float | None:
    path = self.best_dir / "metrics.json"
    return json.loads(path.read_text())[name] if path.is_file() else None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
