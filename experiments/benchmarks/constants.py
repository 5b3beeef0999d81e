"""A module constant set for the length of a block, named on a command line: `module.NAME=VALUE`, VALUE a Python
literal (`kernels.selective_scan.pallas_gpu.GRAD_MAX_REGISTERS=None`). The benchmarks time a kernel option this way
without a copy of the module."""

import ast
import contextlib
import importlib


@contextlib.contextmanager
def patched(constant: str):
  """module.NAME=VALUE set inside the block, and set back after it."""
  path, value = constant.split("=", 1)
  module_name, name = path.rsplit(".", 1)
  module = importlib.import_module(module_name)
  if not hasattr(module, name):
    raise ValueError(f"{module_name} has no {name!r} to patch")
  kept = getattr(module, name)
  setattr(module, name, ast.literal_eval(value))
  try:
    yield
  finally:
    setattr(module, name, kept)
