"""Sweeps of a kernel module's launch settings (its module constants) in one process."""

import itertools
from collections.abc import Iterator, Sequence
from types import ModuleType

import jax


def each_setting(module: ModuleType, settings: dict[str, Sequence]) -> Iterator[str]:
  """Every combination of `settings` ({constant: values}) set on `module` in turn, with JAX's caches cleared so
  that jitted kernels are traced again with it; yields each combination's label ("name=value ...")."""
  for values in itertools.product(*settings.values()):
    setting = dict(zip(settings, values))
    for name, value in setting.items():
      setattr(module, name, value)
    jax.clear_caches()
    yield " ".join(f"{name.lower()}={value}" for name, value in setting.items())
