"""Public selective scan: validates arguments, does the work every impl shares, dispatches.

The impls (`reference`, `xla`, `pallas_gpu`) only run the recurrence on ready inputs; step-size bias
and softplus, the D skip, the z gate, dtype handling and argument checks live here, once.
"""

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.selective_scan import pallas_gpu, reference, xla

_log = logging.getLogger(__name__)

_SCANS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
  "reference": reference.scan,
  "xla": xla.scan,
  "pallas_gpu": pallas_gpu.scan,
}
_NOT_YET = ("pallas_tpu",)
IMPLS = (*_SCANS, "pallas", *_NOT_YET)

# torch.nn.functional.softplus switches to the identity above this input (official kernels too).
_SOFTPLUS_THRESHOLD = 20.0


@functools.cache
def _default_impl(backend: str) -> str:
  """Impl for `impl=None` on `backend`; cached so the choice is logged once per backend."""
  impl = "xla"  # Pallas kernels will take over on GPU/TPU once they are benchmarked.
  _log.info("selective_scan: impl=None on backend %r -> %r", backend, impl)
  return impl


def _pallas_impl(backend: str, interpret: bool) -> str:
  """The Pallas kernel for `backend`: the GPU one on GPU, and on CPU in interpret mode (tests)."""
  if backend == "gpu" or (backend == "cpu" and interpret):
    return "pallas_gpu"
  raise NotImplementedError(
    f"selective_scan: impl='pallas' on backend {backend!r}: no Pallas kernel for it yet"
    " (pallas_gpu runs on GPU, or on CPU with interpret=True); use impl='xla' or impl='reference'."
  )


def _softplus(x: jax.Array) -> jax.Array:
  """torch softplus (threshold 20). The exp branch gets 0 where it is unused, so neither it nor
  its gradient overflows for large inputs (a `minimum` clamp would halve the gradient at 20)."""
  above = x > _SOFTPLUS_THRESHOLD
  return jnp.where(above, x, jnp.log1p(jnp.exp(jnp.where(above, 0.0, x))))


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
      bounded memory), "pallas_gpu" (Pallas Triton forward kernel, gradients via the xla scan),
      "pallas" (the Pallas kernel for the backend: pallas_gpu on GPU, or on CPU with `interpret`;
      NotImplementedError elsewhere), or None to pick by backend (logged once; "xla" for now).
      "pallas_tpu" is reserved and raises NotImplementedError; a named impl never falls back.
    interpret: run Pallas kernels in interpret mode (for CPU tests); ignored by the other impls.

  Returns:
    y with u's shape and dtype, or (y, last_state) with last_state (batch, channels, state). The
    math runs in float32 whatever the input dtype, or float64 if any input is float64 (x64 mode);
    last_state is in that compute dtype.
  """
  sizes: dict[str, int] = {}
  u = _check("u", u, ("batch", "length", "channels"), sizes)
  if sizes["length"] == 0:
    raise ValueError(f"selective_scan: `u` must have length >= 1, got shape {tuple(u.shape)}")
  A = _check("A", A, ("channels", "state"), sizes)
  delta = _check("delta", delta, ("batch", "length", "channels"), sizes)
  B = _check("B", B, ("batch", "length", "state"), sizes)
  C = _check("C", C, ("batch", "length", "state"), sizes)
  if D is not None:
    D = _check("D", D, ("channels",), sizes)
  if z is not None:
    z = _check("z", z, ("batch", "length", "channels"), sizes)
  if delta_bias is not None:
    delta_bias = _check("delta_bias", delta_bias, ("channels",), sizes)

  if impl is None:
    impl = _default_impl(jax.default_backend())
  if impl == "pallas":
    impl = _pallas_impl(jax.default_backend(), interpret)
  if impl in _NOT_YET:
    raise NotImplementedError(
      f"selective_scan: impl={impl!r}: not implemented yet; use impl='xla' or impl='reference'."
    )
  if impl not in _SCANS:
    raise ValueError(f"selective_scan: unknown impl {impl!r}; valid impls: {IMPLS}")

  out_dtype = u.dtype
  dtype = jnp.result_type(jnp.float32, *(x for x in (u, delta, A, B, C, D, z, delta_bias) if x is not None))
  u, delta, A, B, C = (x.astype(dtype) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(dtype)
  if delta_softplus:
    delta = _softplus(delta)
  options = {"interpret": interpret} if impl.startswith("pallas") else {}
  y, last_state = _SCANS[impl](u, delta, A, B, C, reverse=reverse, **options)
  if D is not None:
    y = y + D.astype(dtype) * u
  if z is not None:
    y = y * jax.nn.silu(z.astype(dtype))
  y = y.astype(out_dtype)
  return (y, last_state) if return_last_state else y
