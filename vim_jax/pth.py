"""Read and write PyTorch ``.pth`` checkpoints without torch and without running code from the file.

The released Vim weights are ``torch.save`` pickles. TPU VMs and CI have no torch, and
``torch.load(weights_only=False)``, which the released files need because their ``args`` is an
``argparse.Namespace``, would run whatever the pickle says. ``read_pth`` unpickles with an explicit
allow-list whose globals map to local stand-ins without side effects (tensors become numpy arrays), so
a pickle that names anything else fails before anything runs. ``write_pth`` writes the zip layout that
``torch.save`` writes, so ``torch.load(path, weights_only=True)`` reads the file back as tensors.
"""

import collections
import io
import os
import pickle
import reprlib
import sys
import types
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np


class CheckpointFormatError(ValueError):
  """The file is not a readable torch.save checkpoint (not a zip, truncated, records missing, ...)."""


class UnsafeCheckpointError(ValueError):
  """The pickle names a global outside the allow-list: loading it with torch could run code."""


# The typed storage classes that torch.save still names in its pickles for these dtypes.
_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
}
# torch dtypes as pickles name them (``torch.float32``). Those without a storage class above come only
# with ``_rebuild_tensor_v3``, which pairs an untyped (byte) storage with the dtype.
_TORCH_DTYPES = {dtype.name: dtype for dtype in _STORAGE_DTYPES.values()} | {
  "uint16": np.dtype(np.uint16),
  "uint32": np.dtype(np.uint32),
  "uint64": np.dtype(np.uint64),
  "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
  "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class _StorageType:
  """Stand-in for a torch storage class: only says which dtype the storage's bytes hold."""

  def __init__(self, dtype: np.dtype) -> None:
    self.dtype = dtype


def _strided_copy(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
  """``torch.as_strided(storage, size, stride, offset)`` as a fresh contiguous array.

  The geometry is checked first: ``as_strided`` reads whatever memory the numbers point at.
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype.hasobject:
    raise TypeError(f"a tensor's storage must come from a storage record, not {type(storage).__name__}")
  size, stride = tuple(size), tuple(stride)
  numbers = (offset, *size, *stride)
  if len(size) != len(stride) or not all(type(n) is int and n >= 0 for n in numbers):
    raise ValueError(f"invalid tensor geometry: offset {offset!r}, size {size!r}, stride {stride!r}")
  if 0 in size:
    return np.empty(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= len(storage):
    raise ValueError(
      f"a tensor of size {size}, stride {stride}, offset {offset} reaches element {last} "
      f"of a storage of {len(storage)} elements"
    )
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * itemsize for s in stride], writeable=False)
  return view.copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
  """Stand-in for ``torch._utils._rebuild_tensor_v2``, how torch pickles every dense tensor."""
  return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  """Stand-in for ``torch._utils._rebuild_tensor_v3``: newer dtypes, stored as untyped bytes."""
  if not isinstance(dtype, np.dtype):
    raise TypeError(f"_rebuild_tensor_v3 needs a torch dtype, not {type(dtype).__name__}")
  whole = len(storage) - len(storage) % dtype.itemsize
  return _strided_copy(storage[:whole].view(dtype), storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  """Stand-in for ``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its data here."""
  return data


def _device(kind: str, index: int | None = None) -> str:
  """Stand-in for ``torch.device``: its string form, e.g. ``'cuda:0'``."""
  return str(kind) if index is None else f"{kind}:{index}"


def _latin1_encode(text: str, encoding: str) -> bytes:
  """Stand-in for ``_codecs.encode``, which protocol 2 uses to pickle bytes as latin-1 text."""
  if encoding not in ("latin1", "latin-1"):
    raise ValueError(f"bytes pickled with codec {encoding!r}, expected latin-1")
  return text.encode("latin-1")


def _numpy_scalar(dtype: np.dtype, data: bytes) -> np.generic:
  """Stand-in for numpy's pickled ``scalar(dtype, raw bytes)``."""
  return np.frombuffer(data, dtype, count=1)[0]


def _numpy_array(subtype: type, shape: tuple, dtype: Any) -> np.ndarray:
  """Stand-in for numpy's ``_reconstruct``: an empty array that the pickle's BUILD then fills."""
  if subtype is not np.ndarray:
    raise TypeError(f"numpy array of type {subtype!r}, expected numpy.ndarray")
  return np.ndarray(shape, dtype)


# Everything a checkpoint may name, each mapped to a stand-in that builds data and does nothing else.
# Protocol 2 writes builtins as ``__builtin__``; it has no opcodes for sets or bytes, so it pickles
# them as calls of set/frozenset and of ``_codecs.encode`` (``bytes()`` for b""). numpy scalars and
# arrays occur in the args and optimizer states of real checkpoints.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch", "Size"): tuple,
  ("torch", "device"): _device,
  ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
  ("argparse", "Namespace"): types.SimpleNamespace,
  ("_codecs", "encode"): _latin1_encode,
  ("numpy", "dtype"): np.dtype,
  ("numpy", "ndarray"): np.ndarray,
  **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
  **{("torch", name): dtype for name, dtype in _TORCH_DTYPES.items()},
  **{
    (module, name): stand_in
    for module in ("builtins", "__builtin__")
    for name, stand_in in (("set", set), ("frozenset", frozenset), ("bytes", bytes))
  },
  **{
    (module, name): stand_in
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x
    for name, stand_in in (("scalar", _numpy_scalar), ("_reconstruct", _numpy_array))
  },
}

# torch's pre-1.6 format starts with this number, pickled on its own.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


class _Archive:
  """The storage records of one open checkpoint, read on first use and shared by all their tensors."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str, path: str) -> None:
    self.zf, self.prefix, self.path = zf, prefix, path
    self.byteswap = self._byteorder() != sys.byteorder
    self.storages: dict[str, np.ndarray] = {}

  def _byteorder(self) -> str:
    try:
      order = self.zf.read(self.prefix + "byteorder").decode("ascii", "replace")
    except KeyError:  # torch < 1.10 wrote no record, and only little-endian files
      return "little"
    if order not in ("little", "big"):
      raise CheckpointFormatError(f"{self.path!r} has an unknown byteorder record {order!r}")
    return order

  def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    if key not in self.storages:  # torch too keeps the first reading of a key
      name = f"{self.prefix}data/{key}"
      nbytes = numel * dtype.itemsize
      try:
        with self.zf.open(name) as f:
          data = f.read(nbytes)
      except KeyError:
        raise CheckpointFormatError(f"{self.path!r} has no storage record {name!r}") from None
      if len(data) < nbytes:
        raise CheckpointFormatError(
          f"{self.path!r}: storage record {name!r} holds {len(data)} bytes, "
          f"but its {numel} elements of {dtype} need {nbytes}"
        )
      array = np.frombuffer(data, dtype)
      self.storages[key] = array.byteswap() if self.byteswap else array
    return self.storages[key]


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only allow-listed globals, and storages only from the checkpoint's own records."""

  def __init__(self, file: BinaryIO, archive: _Archive) -> None:
    super().__init__(file)
    self.archive = archive

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _SAFE_GLOBALS[module, name]
    except KeyError:
      raise UnsafeCheckpointError(
        f"refusing to load {self.archive.path!r}: it references {module}.{name}, which is not a tensor or plain data"
      ) from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    match pid:
      case ("storage", _StorageType(dtype=dtype), str(key), str(), int(numel)) if numel >= 0:
        return self.archive.storage(key, dtype, numel)
    raise CheckpointFormatError(f"{self.archive.path!r} has an unknown persistent id {reprlib.repr(pid)}")


def read_pth(path: str | os.PathLike) -> Any:
  """Read a ``torch.save`` checkpoint (zip format, torch >= 1.6); tensors become numpy arrays.

  Nothing in the file is executed: ``UnsafeCheckpointError`` if its pickle names anything but
  tensors and plain data, ``CheckpointFormatError`` if it is not an intact checkpoint.
  ``argparse.Namespace`` objects come back as ``types.SimpleNamespace``, ``torch.device`` as a
  string, ``nn.Parameter`` as its array.
  """
  path = os.fspath(path)
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise CheckpointFormatError(_not_a_zip_message(path, e)) from None
  with zf:
    pickles = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointFormatError(
        f"{path!r} is a zip file but not a torch.save checkpoint: "
        f"expected one <archive>/data.pkl record, found {len(pickles)}"
      )
    try:
      archive = _Archive(zf, pickles[0].removesuffix("data.pkl"), path)
      with zf.open(pickles[0]) as f:
        return _RestrictedUnpickler(f, archive).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    # What unpickling corrupt or hostile bytes, or reading a damaged zip member, may raise.
    except (
      pickle.UnpicklingError,
      EOFError,
      ValueError,
      TypeError,
      KeyError,
      IndexError,
      AttributeError,
      OverflowError,
      zipfile.BadZipFile,
      zlib.error,
    ) as e:
      raise CheckpointFormatError(f"{path!r} is corrupted: {type(e).__name__}: {e}") from e


def _not_a_zip_message(path: str, error: Exception) -> str:
  with open(path, "rb") as f:
    head = f.read(len(_LEGACY_MAGIC))
  if head == _LEGACY_MAGIC:
    return (
      f"{path!r} is in torch's legacy (pre-1.6) format, which read_pth does not read; "
      "re-save it in the zip format with torch >= 1.6: "
      "torch.save(torch.load(old_path, weights_only=True), new_path)"
    )
  if not head:
    return f"{path!r} is empty, not a torch.save checkpoint"
  return f"{path!r} is not a torch.save zip archive (truncated or another format?): {error}"


class _GlobalRef:
  """A global named in the pickle by its dotted path, so torch need not be importable here."""

  def __init__(self, module: str, name: str) -> None:
    self.module, self.name = module, name


class _StorageRef:
  """An array's bytes, pickled as a persistent id the way torch pickles a storage."""

  def __init__(self, array: np.ndarray) -> None:
    self.array = array


_REBUILD_TENSOR_V2 = _GlobalRef("torch._utils", "_rebuild_tensor_v2")
_STORAGE_REFS = {dtype: _GlobalRef("torch", name) for name, dtype in _STORAGE_DTYPES.items()}


class _TorchPickler(pickle._Pickler):
  """Pickles as ``torch.save`` does: arrays as ``_rebuild_tensor_v2`` calls on numbered storages.

  The pure-Python pickler, because its dispatch table lets ``_GlobalRef`` write a GLOBAL opcode for
  a module that cannot be imported here.
  """

  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file: BinaryIO) -> None:
    super().__init__(file, protocol=2)  # torch.save's default
    self.storages: list[np.ndarray] = []

  def persistent_id(self, obj: Any) -> tuple | None:
    if not isinstance(obj, _StorageRef):
      return None
    self.storages.append(obj.array)
    key = str(len(self.storages) - 1)
    return ("storage", _STORAGE_REFS[obj.array.dtype], key, "cpu", obj.array.size)

  def save_global_ref(self, ref: _GlobalRef) -> None:
    self.write(pickle.GLOBAL + f"{ref.module}\n{ref.name}\n".encode("ascii"))
    self.memoize(ref)

  def save_array(self, array: np.ndarray) -> None:
    data = np.asarray(array, array.dtype.newbyteorder("="), order="C")  # keeps 0-d arrays 0-d
    self.save(_REBUILD_TENSOR_V2)
    hooks = collections.OrderedDict()  # torch's backward_hooks, always empty in a saved tensor
    self.save((_StorageRef(data), 0, data.shape, _c_strides(data.shape), False, hooks))
    self.write(pickle.REDUCE)
    self.memoize(array)

  dispatch[_GlobalRef] = save_global_ref
  dispatch[np.ndarray] = save_array


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Row-major strides in elements, as torch gives a contiguous tensor (also an empty one)."""
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


_PLAIN_TYPES = (type(None), bool, int, float, str)


def _check_writable(obj: Any, where: str) -> None:
  """Refuse what ``torch.load(weights_only=True)`` would not read back.

  Types are matched exactly: a subclass (numpy's float64 is a float) would be pickled by its own global.
  """
  if type(obj) is np.ndarray:
    if obj.dtype.newbyteorder("=") not in _STORAGE_REFS:
      names = ", ".join(dtype.name for dtype in _STORAGE_REFS)
      raise TypeError(f"{where}: write_pth writes arrays of {names}, not {obj.dtype}")
  elif type(obj) in (dict, collections.OrderedDict):
    for key, value in obj.items():
      _check_writable(key, f"{where} key {key!r}")
      _check_writable(value, f"{where}[{key!r}]")
  elif type(obj) in (list, tuple):
    for i, value in enumerate(obj):
      _check_writable(value, f"{where}[{i}]")
  elif type(obj) not in _PLAIN_TYPES:
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(
      f"{where}: cannot write {kind}; write_pth takes dicts, lists and tuples of numpy arrays "
      "(np.asarray other arrays), None, bool, int, float and str"
    )


def write_pth(path: str | os.PathLike, obj: Any) -> None:
  """Write ``obj`` as ``torch.save(obj, path)`` would, numpy arrays as tensors.

  ``torch.load(path, weights_only=True)`` reads it back. ``obj`` is a (nested) dict, OrderedDict,
  list or tuple of numpy arrays (the dtypes of torch's storage classes: float64/32/16, bfloat16,
  int64/32/16/8, uint8, bool) and plain values. The file is replaced atomically, so a crash never
  leaves half a checkpoint behind.
  """
  _check_writable(obj, "obj")
  pickled = io.BytesIO()
  pickler = _TorchPickler(pickled)
  pickler.dump(obj)
  records = [
    ("data.pkl", pickled.getbuffer()),
    (".format_version", b"1"),
    (".storage_alignment", b"64"),
    ("byteorder", sys.byteorder.encode("ascii")),
    *((f"data/{i}", array.reshape(-1).view(np.uint8).data) for i, array in enumerate(pickler.storages)),
    ("version", b"3\n"),
  ]
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "xb") as f:
      _write_zip(f, path.stem, records)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _write_zip(f: BinaryIO, archive: str, records: list[tuple[str, Any]]) -> None:
  """Uncompressed records under ``<archive>/``, each one's data 64-byte aligned as torch aligns them
  (for ``torch.load(mmap=True)``), padded by an extra field as torch pads it."""
  with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
    for name, data in records:
      info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
      zip64 = 20 if len(data) * 1.05 > zipfile.ZIP64_LIMIT else 0  # zipfile's own rule and size
      header = 30 + len(info.filename.encode("utf-8")) + zip64
      padding = -(f.tell() + header + 4) % 64
      info.extra = b"FB" + padding.to_bytes(2, "little") + b"Z" * padding
      zf.writestr(info, data)
