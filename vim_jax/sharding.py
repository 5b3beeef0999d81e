"""Device mesh and shardings: data parallel by default, FSDP (parameters split over devices) on request.

The mesh has two axes: `data` (replicas) and `fsdp` (parameter shards). The batch is split over both,
so FSDP devices also share the batch; parameters and optimizer state are split over `fsdp` only.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices (of all processes); `fsdp` devices per parameter shard."""
  devices = devices if devices is not None else jax.devices()
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"`mesh.fsdp` must divide the number of devices ({len(devices)}), got {fsdp}")
  # Auto axes: shardings are given at the jit boundary and XLA propagates them through the model, so the
  # model code carries no sharding annotations (newer JAX defaults make_mesh to Explicit axes).
  auto = (jax.sharding.AxisType.Auto,) * 2
  mesh = jax.make_mesh((len(devices) // fsdp, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)
  log.info("mesh: %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
  return mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**12) -> PartitionSpec:
  """Split the largest dimension divisible by `fsdp`; small arrays stay replicated (not worth it)."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return PartitionSpec(*spec)
  return PartitionSpec()


def state_shardings(mesh: Mesh, abstract_state):
  """Shardings for a pytree of arrays (params, optimizer state, EMA): FSDP rule per leaf."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays split over the mesh (each process passes its share)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
