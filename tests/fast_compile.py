"""Compiling in tests without XLA:CPU's backend (LLVM) optimisation: most of the compile time of interpret-mode
kernels and of XLA's chunked scan, where the tests check numbers, not speed."""

import jax

OPTIONS = {"xla_backend_optimization_level": 0}


def compiled(fn, *args) -> jax.stages.Compiled:
  """fn jitted and compiled for `args`."""
  return jax.jit(fn).lower(*args).compile(OPTIONS)
