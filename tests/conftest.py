"""Shared test fixtures: paths of the golden data shipped in tests/data."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"
VIM_REF = DATA / "vim_small_midcls"


@pytest.fixture(scope="session")
def vim_ref() -> dict:
  """The small official Vim: state_dict, NHWC inputs, logits, activations (vim_small_midcls/README.md)."""
  return {
    "state_dict": dict(np.load(VIM_REF / "params.npz")),
    "images": np.load(VIM_REF / "inputs.npy").transpose(0, 2, 3, 1),
    "images_nchw": np.load(VIM_REF / "inputs.npy"),
    "logits64": np.load(VIM_REF / "logits_float64.npy"),
    "activations": dict(np.load(VIM_REF / "activations.npz")),
  }


@pytest.fixture
def x64():
  """float64 for this test only: the context manager restores the previous setting on exit."""
  import jax

  with jax.enable_x64(True):
    yield


def pytest_configure(config):
  """Eight CPU devices for the sharding tests (must be set before JAX initialises its backends)."""
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
