"""Console logging for the command-line tools: our messages at INFO, library chatter (orbax) at WARNING."""

from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging


def setup() -> None:
  """vim_jax.* loggers print INFO to stderr; absl (used by orbax) stays at WARNING unless -v is given."""
  logger = logging.getLogger("vim_jax")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
