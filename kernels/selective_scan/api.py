"""Public selective scan: validates arguments, picks an impl, runs it per device under a mesh.

The XLA impls (`reference`, `xla`) and the TPU kernel run the recurrence alone on ready inputs: step-size
bias and softplus, the D skip, the z gate and dtype handling are done here around them, once. The GPU
kernel (`pallas_gpu`) takes the raw arguments and does all of that inside, so no float32 copy of an
input crosses memory.
"""

import functools
import logging
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.tree_util import keystr

from kernels.selective_scan import pallas_gpu, pallas_tpu, reference, xla
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.negative_exp import NegativeExp
from kernels.selective_scan.padding import plain
from kernels.selective_scan.softplus import softplus

_log = logging.getLogger(__name__)

ScanFn = Callable[..., tuple[jax.Array, jax.Array]]
# The recurrence alone, on inputs in the compute dtype: (u, delta, A, B, C, *, reverse) -> (y, last state).
_RECURRENCES: dict[str, ScanFn] = {"reference": reference.scan, "xla": xla.scan, "pallas_tpu": pallas_tpu.scan}
# The whole scan, with `selective_scan`'s arguments (checked) and its (y, last state) result.
_FUSED: dict[str, ScanFn] = {"pallas_gpu": pallas_gpu.scan}
_KERNELS = ("pallas_gpu", "pallas_tpu")
IMPLS = (*_RECURRENCES, *_FUSED, "pallas")


class Direction(NamedTuple):
  """One direction's arguments of `selective_scan_bidirectional`, as in `selective_scan`."""

  u: jax.Array
  delta: jax.Array
  A: jax.Array | NegativeExp
  B: jax.Array | Columns
  C: jax.Array | Columns
  D: jax.Array | None = None
  delta_bias: jax.Array | None = None


@functools.cache
def _default_impl(backend: str) -> str:
  """Impl for `impl=None` on `backend`; cached so the choice is logged once per backend."""
  impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
  _log.info("selective_scan: impl=None on backend %r -> %r", backend, impl)
  return impl


def _resolve(impl: str | None, interpret: bool) -> str:
  """The impl that runs: None by backend, "pallas" the backend's kernel (the GPU one on CPU with
  `interpret`, for tests); a named impl never falls back."""
  backend = jax.default_backend()
  if impl is None:
    impl = _default_impl(backend)
  if impl == "pallas":
    if backend in ("gpu", "tpu"):
      return f"pallas_{backend}"
    if backend == "cpu" and interpret:
      return "pallas_gpu"
    raise NotImplementedError(
      f"selective_scan: impl='pallas' on backend {backend!r}: no Pallas kernel for it (pallas_gpu and"
      " pallas_tpu run on their backends, or on CPU with interpret=True); use impl='xla' or impl='reference'."
    )
  if impl not in IMPLS:
    raise ValueError(f"selective_scan: unknown impl {impl!r}; valid impls: {IMPLS}")
  return impl


def _channel_axes(channel_axes: str | tuple[str, ...], channels: int) -> tuple[str, ...]:
  """`channel_axes` as a tuple, checked against the mesh and the channel count whatever the impl, so that
  a bad value fails the same way on every backend."""
  axes = (channel_axes,) if isinstance(channel_axes, str) else tuple(channel_axes)
  if not axes:
    return axes
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"selective_scan: `channel_axes` must be () without a mesh (jax.set_mesh), got {axes}")
  if any(a not in mesh.axis_names for a in axes) or len(set(axes)) < len(axes):
    raise ValueError(f"selective_scan: `channel_axes` must be distinct axes of the mesh {mesh.axis_names}, got {axes}")
  shards = math.prod(mesh.shape[a] for a in axes)
  if channels % shards:
    raise ValueError(
      f"selective_scan: `channel_axes` {axes} split the channels {shards} ways, so the channel count must be"
      f" divisible by {shards}, got {channels}"
    )
  return axes


def _per_device(impl: str, fn: Callable, arrays: dict, outputs: str | tuple[str, ...], channel_axes: tuple[str, ...]):
  """fn(**arrays), one call per device when a mesh is set and `impl` is a kernel: XLA's partitioner cannot
  split a Pallas call. Arrays (named by the last key of their path in `arrays`; None leaves allowed) and
  the outputs named in `outputs` are split by their `_DIMS`: channels over `channel_axes`, batch over the
  other mesh axes, the rest whole. So A, D and delta_bias are replicated over the batch axes and B and C
  over the channel axes; their gradients are per-shard parts that the transpose of a `check_vma=False`
  shard_map sums over the axes missing from the input's spec (the kernels declare no varying axes, so
  vma checking cannot be on). The mesh tests check that sum."""
  mesh = jax.sharding.get_abstract_mesh()
  if impl not in _KERNELS or mesh.empty:
    return fn(**arrays)
  batch = tuple(a for a in mesh.axis_names if a not in channel_axes)

  def spec(dims: tuple[str, ...]) -> P:
    return P(*(batch if d == "batch" else channel_axes if d == "channels" else None for d in dims))

  in_specs = jax.tree_util.tree_map_with_path(lambda path, _: spec(_DIMS[keystr(path[-1:], simple=True)]), arrays)
  out_specs = jax.tree.map(lambda name: spec(_DIMS[name]), outputs)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:  # explicit shardings must already match the specs
    arrays = jax.tree.map(jax.sharding.reshard, arrays, in_specs)
  return jax.shard_map(lambda a: fn(**a), in_specs=(in_specs,), out_specs=out_specs, check_vma=False)(arrays)


def _check(name: str, x, dims: tuple[str, ...], sizes: dict[str, int]) -> jax.Array | Columns | NegativeExp:
  """Checks `x` is a floating array of shape `dims` (named sizes already in `sizes` must match),
  records the sizes it defines, and returns it as a jax array; B, C and z may be `Columns` windows, A a
  `NegativeExp`."""
  if isinstance(x, Columns) and dims in (_SEQ_STATE, _SEQ):
    x = Columns(jnp.asarray(x.array), x.start, x.size)
  elif isinstance(x, NegativeExp) and dims == _DIMS["A"]:
    x = NegativeExp(jnp.asarray(x.log))
  else:
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"selective_scan: `{name}` must have a floating dtype, got {x.dtype}")
  expected = tuple(sizes.get(d, d) for d in dims)
  if len(x.shape) != len(dims) or any(e != s for e, s in zip(expected, x.shape) if isinstance(e, int)):
    want = f"({', '.join(dims)})"
    if expected != dims:
      want += f" = ({', '.join(map(str, expected))})"
    raise ValueError(f"selective_scan: `{name}` must have shape {want}, got {tuple(x.shape)}")
  sizes.update(zip(dims, x.shape))
  return x


def _sliced(args: Direction) -> Direction:
  """`args` with `Columns` windows sliced and a `NegativeExp` computed, for the impls that take plain arrays."""
  return Direction(*plain(args))


_SEQ, _SEQ_STATE, _CHANNEL = ("batch", "length", "channels"), ("batch", "length", "state"), ("channels",)
_DIMS = dict(u=_SEQ, delta=_SEQ, A=("channels", "state"), B=_SEQ_STATE, C=_SEQ_STATE, D=_CHANNEL, delta_bias=_CHANNEL)
_DIMS.update(z=_SEQ, y=_SEQ, last_state=("batch", "channels", "state"))  # for `_per_device`
_DIMS.update(array=_SEQ_STATE, log=_DIMS["A"])  # a `Columns` window's array (B or C), a `NegativeExp`'s log (A)


def _checked(args: Direction, sizes: dict[str, int], prefix: str = "") -> Direction:
  """`args` checked against each other and `sizes` (u first: its shape names the sizes)."""
  u = _check(prefix + "u", args.u, _SEQ, sizes)
  if u.shape[1] == 0:
    raise ValueError(f"selective_scan: `{prefix}u` must have length >= 1, got shape {tuple(u.shape)}")
  checked = {
    name: None if x is None else _check(prefix + name, x, _DIMS[name], sizes)
    for name, x in args._asdict().items()
    if name != "u"
  }
  return Direction(u, **checked)


def selective_scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  z: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  *,
  delta_softplus: bool = False,
  reverse: bool = False,
  return_last_state: bool = False,
  impl: str | None = None,
  interpret: bool = False,
  channel_axes: str | tuple[str, ...] = (),
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Mamba's selective scan (S6), exactly the official `selective_scan_ref`, channel-last.

  delta' = softplus(delta + delta_bias)  (bias and softplus optional; torch softplus, threshold 20)
  h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t,   h_{-1} = 0
  y_t    = sum_n h_t[..., n] C_t[n] + D u_t,   then y *= silu(z)   (D and z optional)

  Args:
    u, delta, z: (batch, length, channels).
    A: (channels, state), real (negative in Mamba); or `NegativeExp(A_log)`, Mamba's parametrisation, which
      the GPU kernel computes from A_log itself.
    B, C: (batch, length, state), shared by all channels; or `Columns` windows of one wider array (x_proj's
      output), which the GPU kernel reads in place where a window is a whole state-wide block of columns.
    D, delta_bias: (channels,).
    delta_softplus: apply softplus to delta (+ delta_bias).
    reverse: run the recurrence from the last position to the first (Vim's backward direction);
      the same as flipping every sequence input along length, scanning and flipping y back, but the
      caller flips nothing. `last_state` is then the state after position 0.
    return_last_state: also return the final state h.
    impl: "reference" (sequential lax.scan, the ground truth), "xla" (chunked, bounded memory: an
      associative scan inside each chunk, sequential on CPU), "pallas_gpu" (fused Pallas Triton kernels),
      "pallas_tpu" (Pallas Mosaic TPU kernels), "pallas" (the backend's kernel; on CPU the GPU one with
      `interpret`), or None: by backend, the kernel on GPU and TPU, "xla" elsewhere (logged once).
      A named impl never falls back. Under a mesh (`jax.set_mesh`) the kernels run per device
      (`shard_map`), as XLA cannot split a Pallas call: the channels split over `channel_axes`, the batch
      over the other mesh axes.
    interpret: run Pallas kernels in interpret mode (for CPU tests); ignored by the other impls.
    channel_axes: mesh axes (a name or a tuple) over which the kernels split the channels, for tensor
      parallelism: u, delta, z, A, D, delta_bias and the outputs by channel, B and C whole on every
      channel shard (their gradients summed over the shards). () without a mesh; with one, distinct
      mesh axes whose sizes multiply to a divisor of the channel count. Checked for every impl, but
      used by the kernels only: XLA's partitioner splits the XLA impls as their inputs are sharded.

  Returns:
    y with u's shape and dtype, or (y, last_state) with last_state (batch, channels, state). The
    math runs in float32 whatever the input dtype, or float64 if any input is float64 (x64 mode);
    last_state is in that compute dtype.
  """
  sizes: dict[str, int] = {}
  args = _checked(Direction(u, delta, A, B, C, D, delta_bias), sizes)
  if z is not None:
    z = plain((_check("z", z, _SEQ, sizes),))[0]
  impl = _resolve(impl, interpret)
  channel_axes = _channel_axes(channel_axes, sizes["channels"])
  options = dict(reverse=reverse, **({"interpret": interpret} if impl in _KERNELS else {}))
  if impl in _FUSED:

    def fused(args: Direction, z):
      return _FUSED[impl](*args[:5], args.D, z, args.delta_bias, delta_softplus=delta_softplus, **options)

    y, last_state = _per_device(impl, fused, dict(args=args, z=z), ("y", "last_state"), channel_axes)
    return (y, last_state) if return_last_state else y

  u, delta, A, B, C, D, delta_bias = args = _sliced(args)
  dtype = jnp.result_type(jnp.float32, *(x for x in (*args, z) if x is not None))
  u, delta, A, B, C = (x.astype(dtype) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(dtype)
  if delta_softplus:
    delta = softplus(delta)
  recurrence = functools.partial(_RECURRENCES[impl], **options)
  arrays = dict(u=u, delta=delta, A=A, B=B, C=C)
  y, last_state = _per_device(impl, recurrence, arrays, ("y", "last_state"), channel_axes)
  if D is not None:
    y = y + D.astype(dtype) * u
  if z is not None:
    y = y * jax.nn.silu(z.astype(dtype))
  y = y.astype(args.u.dtype)
  return (y, last_state) if return_last_state else y


def selective_scan_bidirectional(
  forward: Direction,
  backward: Direction,
  z: jax.Array | None = None,
  *,
  delta_softplus: bool = False,
  divide_out: bool = True,
  impl: str | None = None,
  interpret: bool = False,
  channel_axes: str | tuple[str, ...] = (),
) -> jax.Array:
  """Vim's bidirectional scan: (y_f + y_b) / 2 (a plain sum if not `divide_out`), where
  y_f = selective_scan(*forward, z) and y_b = selective_scan(*backward, z, reverse=True) share the gate.

  The same as two `selective_scan` calls and the combine (impls, `delta_softplus`, `interpret` and
  `channel_axes` as there), but `pallas_gpu` fuses the combine into the second direction's kernel: it
  reads the first direction's output back instead of both outputs and z again, about a quarter less
  memory traffic. z may be a `Columns` window of a wider array (in_proj's output), which `pallas_gpu` reads in place
  where it is whole blocks of its kernels' channels and no mesh axis splits the channels.
  Returns y in forward.u's shape and dtype.
  """
  sizes: dict[str, int] = {}
  forward = _checked(Direction(*forward), sizes, "forward.")
  backward = _checked(Direction(*backward), sizes, "backward.")
  if z is not None:
    z = _check("z", z, _SEQ, sizes)
  impl = _resolve(impl, interpret)
  channel_axes = _channel_axes(channel_axes, sizes["channels"])
  if isinstance(z, Columns) and (impl != "pallas_gpu" or channel_axes):  # read in place by pallas_gpu's kernels
    z = z.value()  # alone, and whole on a device only where no shard splits its channels
  if impl == "pallas_gpu":
    fused = functools.partial(
      pallas_gpu.bidirectional, delta_softplus=delta_softplus, divide_out=divide_out, interpret=interpret
    )
    return _per_device(impl, fused, dict(forward=forward, backward=backward, z=z), "y", channel_axes)
  combine_dtype = jnp.promote_types(forward.u.dtype, jnp.float32)  # float64 stays float64
  ys = [
    selective_scan(*args[:5], args.D, z, args.delta_bias, delta_softplus=delta_softplus, reverse=reverse,
                   impl=impl, interpret=interpret, channel_axes=channel_axes).astype(combine_dtype)
    for args, reverse in ((forward, False), (backward, True))
  ]  # fmt: skip
  y = ys[0] + ys[1]
  return (y / 2 if divide_out else y).astype(forward.u.dtype)
