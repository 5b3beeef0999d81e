"""Public selective scan: validates arguments, picks an impl, runs it per device under a mesh.

The XLA impls (`reference`, `xla`) and the TPU kernel run the recurrence alone on ready inputs: step-size
bias and softplus, the D skip, the z gate and dtype handling are done here around them, once. The GPU
kernel (`pallas_gpu`) takes the raw arguments and does all of that inside, so no float32 copy of an
input crosses memory.
"""

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels.selective_scan import pallas_gpu, pallas_tpu, reference, xla
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
  A: jax.Array
  B: jax.Array
  C: jax.Array
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


def _per_device(impl: str, fn: Callable, *args):
  """fn(*args), one call per device when a mesh is set and `impl` is a kernel: XLA's partitioner cannot
  split a Pallas call. The batch (dim 0 of the per-sequence arrays and of every output) is split over
  all mesh axes; A, D and delta_bias are replicated. `args` may be pytrees with None leaves."""
  mesh = jax.sharding.get_abstract_mesh()
  if impl not in _KERNELS or mesh.empty:
    return fn(*args)
  batch = P(mesh.axis_names)
  specs = jax.tree.map(lambda x: batch if x.ndim == 3 else P(), args)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:  # explicit shardings must already match the specs
    args = jax.tree.map(jax.sharding.reshard, args, specs)
  return jax.shard_map(fn, in_specs=specs, out_specs=batch, check_vma=False)(*args)


def _check(name: str, x, dims: tuple[str, ...], sizes: dict[str, int]) -> jax.Array:
  """Checks `x` is a floating array of shape `dims` (named sizes already in `sizes` must match),
  records the sizes it defines, and returns it as a jax array."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"selective_scan: `{name}` must have a floating dtype, got {x.dtype}")
  expected = tuple(sizes.get(d, d) for d in dims)
  if x.ndim != len(dims) or any(e != s for e, s in zip(expected, x.shape) if isinstance(e, int)):
    want = f"({', '.join(dims)})"
    if expected != dims:
      want += f" = ({', '.join(map(str, expected))})"
    raise ValueError(f"selective_scan: `{name}` must have shape {want}, got {tuple(x.shape)}")
  sizes.update(zip(dims, x.shape))
  return x


_SEQ, _SEQ_STATE, _CHANNEL = ("batch", "length", "channels"), ("batch", "length", "state"), ("channels",)
_DIMS = dict(u=_SEQ, delta=_SEQ, A=("channels", "state"), B=_SEQ_STATE, C=_SEQ_STATE, D=_CHANNEL, delta_bias=_CHANNEL)


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
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Mamba's selective scan (S6), exactly the official `selective_scan_ref`, channel-last.

  delta' = softplus(delta + delta_bias)  (bias and softplus optional; torch softplus, threshold 20)
  h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t,   h_{-1} = 0
  y_t    = sum_n h_t[..., n] C_t[n] + D u_t,   then y *= silu(z)   (D and z optional)

  Args:
    u, delta, z: (batch, length, channels).
    A: (channels, state), real (negative in Mamba).
    B, C: (batch, length, state), shared by all channels.
    D, delta_bias: (channels,).
    delta_softplus: apply softplus to delta (+ delta_bias).
    reverse: run the recurrence from the last position to the first (Vim's backward direction);
      the same as flipping every sequence input along length, scanning and flipping y back, but the
      caller flips nothing. `last_state` is then the state after position 0.
    return_last_state: also return the final state h.
    impl: "reference" (sequential lax.scan, the ground truth), "xla" (chunked associative scan,
      bounded memory), "pallas_gpu" (fused Pallas Triton kernels), "pallas_tpu" (Pallas Mosaic TPU
      kernels), "pallas" (the backend's kernel; on CPU the GPU one with `interpret`), or None: by
      backend, the kernel on GPU and TPU, "xla" elsewhere (logged once). A named impl never falls back.
      Under a mesh (`jax.set_mesh`) the kernels run per device on the batch split over all mesh axes.
    interpret: run Pallas kernels in interpret mode (for CPU tests); ignored by the other impls.

  Returns:
    y with u's shape and dtype, or (y, last_state) with last_state (batch, channels, state). The
    math runs in float32 whatever the input dtype, or float64 if any input is float64 (x64 mode);
    last_state is in that compute dtype.
  """
  sizes: dict[str, int] = {}
  args = _checked(Direction(u, delta, A, B, C, D, delta_bias), sizes)
  if z is not None:
    z = _check("z", z, _SEQ, sizes)
  impl = _resolve(impl, interpret)
  options = dict(reverse=reverse, **({"interpret": interpret} if impl in _KERNELS else {}))
  if impl in _FUSED:

    def fused(args: Direction, z):
      return _FUSED[impl](*args[:5], args.D, z, args.delta_bias, delta_softplus=delta_softplus, **options)

    y, last_state = _per_device(impl, fused, args, z)
    return (y, last_state) if return_last_state else y

  u, delta, A, B, C, D, delta_bias = args
  dtype = jnp.result_type(jnp.float32, *(x for x in (*args, z) if x is not None))
  u, delta, A, B, C = (x.astype(dtype) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(dtype)
  if delta_softplus:
    delta = softplus(delta)
  recurrence = functools.partial(_RECURRENCES[impl], **options)
  y, last_state = _per_device(impl, recurrence, u, delta, A, B, C)
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
) -> jax.Array:
  """Vim's bidirectional scan: (y_f + y_b) / 2 (a plain sum if not `divide_out`), where
  y_f = selective_scan(*forward, z) and y_b = selective_scan(*backward, z, reverse=True) share the gate.

  The same as two `selective_scan` calls and the combine (impls, `delta_softplus` and `interpret` as
  there), but `pallas_gpu` fuses the combine into the second direction's kernel: it reads the first
  direction's output back instead of both outputs and z again, about a quarter less memory traffic.
  Returns y in forward.u's shape and dtype.
  """
  sizes: dict[str, int] = {}
  forward = _checked(Direction(*forward), sizes, "forward.")
  backward = _checked(Direction(*backward), sizes, "backward.")
  if z is not None:
    z = _check("z", z, _SEQ, sizes)
  impl = _resolve(impl, interpret)
  if impl == "pallas_gpu":
    fused = functools.partial(
      pallas_gpu.bidirectional, delta_softplus=delta_softplus, divide_out=divide_out, interpret=interpret
    )
    return _per_device(impl, fused, forward, backward, z)
  ys = [
    selective_scan(*args[:5], args.D, z, args.delta_bias, delta_softplus=delta_softplus, reverse=reverse,
                   impl=impl, interpret=interpret).astype(jnp.float32)
    for args, reverse in ((forward, False), (backward, True))
  ]  # fmt: skip
  y = ys[0] + ys[1]
  return (y / 2 if divide_out else y).astype(forward.u.dtype)
