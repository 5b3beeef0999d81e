r"""Train Vim: `python -m vim_jax.train --config=configs/tiny.py --workdir=runs/vim_tiny`.

Restarting the same command in the same workdir resumes from the newest checkpoint. Config fields
can be overridden: `--config.optim.lr=1e-3 --config.total_steps=1000`.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from vim_jax import logs, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID"):
    jax.distributed.initialize()  # multi-host: one process per host, coordinates from the environment
  logging.getLogger("vim_jax.train").info(
    "jax %s, process %d of %d", jax.__version__, jax.process_index(), jax.process_count()
  )
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
