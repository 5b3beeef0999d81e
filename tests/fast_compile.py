"""Compiling in tests without XLA:CPU's backend (LLVM) optimisation: most of the compile time of interpret-mode
kernels and of XLA's chunked scan, where the tests check numbers, not speed. Not for tests that run many steps
(the demo's training ran 131 s with optimisation, 321 s without)."""

import functools

import jax
from flax import nnx

OPTIONS = {"xla_backend_optimization_level": 0}


def compiled(fn, *args) -> jax.stages.Compiled:
  """fn jitted and compiled for `args`."""
  return jax.jit(fn).lower(*args).compile(OPTIONS)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=OPTIONS)
def _method(graphdef: nnx.GraphDef, name: str, state: nnx.State, *args):
  return getattr(nnx.merge(graphdef, state), name)(*args)


def logits_of(model: nnx.Module, images: jax.Array) -> jax.Array:
  """model(images), compiled once per model graph and input shapes."""
  graphdef, state = nnx.split(model)
  return _method(graphdef, "__call__", state, images)


def tokens_of(model: nnx.Module, images: jax.Array) -> jax.Array:
  """model.forward_tokens(images), compiled as `logits_of`."""
  graphdef, state = nnx.split(model)
  return _method(graphdef, "forward_tokens", state, images)
