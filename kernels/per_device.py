"""Pallas kernels under a mesh: XLA's SPMD partitioner cannot split a Pallas call, so each runs per device."""

import jax
from jax.sharding import PartitionSpec as P


def per_device(fn, split: tuple, whole: tuple):
  """fn(*split, *whole), per device under the current mesh (called as is where there is none).

  Each array of `split` (the batch, or rows; or a pytree of such, a `Columns` window) is split along its first axis
  over every mesh axis; each entry of `whole` (weights, any pytree) is whole on every device; every output is split
  like `split`. The weights' gradients' per-device parts are summed by the shard_map's transpose."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*split, *whole)
  rows = P(mesh.axis_names)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    split = jax.tree.map(lambda a: jax.sharding.reshard(a, rows), split)
    whole = jax.tree.map(lambda a: jax.sharding.reshard(a, P()), whole)
  in_specs = (*(rows,) * len(split), *(P(),) * len(whole))
  return jax.shard_map(fn, in_specs=in_specs, out_specs=rows, check_vma=False)(*split, *whole)
