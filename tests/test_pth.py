"""vim_jax.pth: reads real torch checkpoints without torch, refuses hostile ones, writes torch's layout."""

import collections
import os
import pickle
import re
import struct
import subprocess
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from vim_jax.pth import CheckpointFormatError, UnsafeCheckpointError, read_pth, write_pth

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "vim_small_midcls"
TORCH_MADE = DATA / "pth"  # written by torch itself; see the README there


def _records(path: Path) -> dict[str, bytes]:
  with zipfile.ZipFile(path) as zf:
    return {name: zf.read(name) for name in zf.namelist()}


def _make_zip(path: Path, records: dict[str, bytes]) -> Path:
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in records.items():
      zf.writestr(name, data)
  return path


def _assert_same_arrays(got: dict, expected) -> None:
  assert sorted(got) == sorted(expected)
  for key in got:
    assert got[key].dtype == expected[key].dtype, key
    assert got[key].shape == expected[key].shape, key
    assert got[key].tobytes() == expected[key].tobytes(), key  # bit for bit, NaN payloads too


# --- the reference checkpoints of the official code -------------------------------------------


def test_reads_reference_state_dict_exactly():
  checkpoint = read_pth(REFERENCE / "checkpoint.pth")
  assert list(checkpoint) == ["model"]
  with np.load(REFERENCE / "params.npz") as params:
    assert len(params.files) == 75
    _assert_same_arrays(checkpoint["model"], params)


def test_reads_released_layout_with_args_and_optimizer():
  checkpoint = read_pth(REFERENCE / "checkpoint_full.pth")
  assert set(checkpoint) == {"model", "optimizer", "lr_scheduler", "epoch", "model_ema", "scaler", "args"}
  with np.load(REFERENCE / "params.npz") as params:
    _assert_same_arrays(checkpoint["model"], params)
  with np.load(REFERENCE / "checkpoint_full_ema_params.npz") as ema:
    _assert_same_arrays(checkpoint["model_ema"], ema)
  args = checkpoint["args"]
  assert isinstance(args, types.SimpleNamespace)
  assert (args.model, args.lr, args.epochs) == ("vim_small_reference", 0.001, 300)
  assert checkpoint["epoch"] == 299
  optimizer = checkpoint["optimizer"]
  assert len(optimizer["state"]) == 75
  assert optimizer["state"][0]["exp_avg"].shape == (1, 1, 64)
  assert optimizer["param_groups"][0]["lr"] > 0


# --- files written by torch --------------------------------------------------------------------


def test_torch_written_dtypes():
  got = read_pth(TORCH_MADE / "dtypes.pth")
  # The values of tests/data/pth/README.md's script, all exact in their dtype.
  inf, nan = float("inf"), float("nan")
  expected = {
    "float32": np.array([0.0, -0.0, 1.5, -2.25, inf, -inf, nan, 2.0**-149], np.float32),
    "float64": np.array([[0.1, -1e300], [5e-324, 3.0]]),
    "float16": np.array([0.5, -65504.0, 2.0**-24, inf], np.float16),
    "bfloat16": np.array([1.0, -3.5, 1.5 * 2.0**127, 2.0**-133], ml_dtypes.bfloat16),
    "int64": np.array([-(2**63), 2**63 - 1, 0, -1]),
    "int32": np.array([-(2**31), 2**31 - 1], np.int32),
    "int16": np.array([-(2**15), 2**15 - 1], np.int16),
    "int8": np.array([-128, 127], np.int8),
    "uint8": np.array([0, 255], np.uint8),
    "bool": np.array([[True, False, True]]),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
  }
  _assert_same_arrays(got, expected)


def test_torch_written_views_of_one_storage():
  got = read_pth(TORCH_MADE / "views.pth")
  assert isinstance(got, collections.OrderedDict)
  base = np.arange(24, dtype=np.float32).reshape(4, 6)
  expected = {
    "base": base,
    "transposed": base.T,
    "block": base[1:3, 2:5],
    "row": base[2],
    "every_other": base[:, ::2],
    "element": np.array(base[1, 1]),
    "expanded": np.broadcast_to(np.arange(3), (4, 3)),
    "param": np.full(2, 0.75, np.float32),
  }
  _assert_same_arrays(got, {k: np.array(v) for k, v in expected.items()})
  for array in got.values():  # fresh arrays, not views into the file's storages
    assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata


def test_torch_written_plain_data():
  got = read_pth(TORCH_MADE / "misc.pth")
  assert got["nested"] == {"a": {"b": [1, 2.5, "three", None, (True, False)]}}
  assert vars(got["args"]) == dict(lr=0.5, model="vim_tiny", sizes=[224, 224], amp=True, resume="")
  assert type(got["np_float"]) is np.float64 and got["np_float"] == 0.25
  assert type(got["np_int"]) is np.int64 and got["np_int"] == 7
  np.testing.assert_array_equal(got["np_array"], np.arange(3, dtype=np.int32))
  assert got["np_array"].dtype == np.int32
  assert got["device"] == "cpu"
  assert got["size"] == (2, 3)
  assert got["set"] == {1, 2}
  assert (got["bytes"], got["empty_bytes"]) == (b"\x00\xffab", b"")
  assert got["dtype"] == np.float32
  _assert_same_arrays(
    {k: got[k] for k in ("uint16", "float8")},
    {
      "uint16": np.array([0, 65535], np.uint16),
      "float8": np.array([0.5, -448.0], ml_dtypes.float8_e4m3fn),
    },
  )


def test_legacy_format_is_refused_with_advice():
  with pytest.raises(CheckpointFormatError, match=r"legacy \(pre-1\.6\) format.*re-save"):
    read_pth(TORCH_MADE / "legacy.pth")


def test_big_endian_file(tmp_path):
  arrays = {
    "f32": np.linspace(-1, 1, 6, dtype=np.float32),
    "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
    "i64": np.array([1, -(2**40)]),
    "b": np.array([True, False]),
  }
  write_pth(tmp_path / "little.pth", arrays)
  records = _records(tmp_path / "little.pth")
  for i, array in enumerate(arrays.values()):  # storages are numbered in order of appearance
    records[f"little/data/{i}"] = array.byteswap().tobytes()
  records["little/byteorder"] = b"big"
  _assert_same_arrays(read_pth(_make_zip(tmp_path / "big.pth", records)), arrays)


# --- hostile pickles ---------------------------------------------------------------------------


class _Call:
  """Pickles as ``func(*args)``: what an attacker's pickle does on load."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
  touch = f"touch {marker}"
  return {
    "os.system": f"cos\nsystem\n(V{touch}\ntR.".encode(),  # protocol 0, by hand
    "os.system by reduce": pickle.dumps(_Call(os.system, touch), protocol=2),  # posix.system on Linux
    "builtins.eval": pickle.dumps(_Call(eval, f"open({str(marker)!r}, 'w')"), protocol=2),
    "subprocess.Popen": pickle.dumps(_Call(subprocess.Popen, ["touch", str(marker)]), protocol=2),
    # Hidden in a state dict that an allowed call builds, after an ordinary entry.
    "nested in OrderedDict": pickle.dumps(
      {"model": _Call(collections.OrderedDict, [("w", 1.0), ("b", _Call(os.system, touch))])},
      protocol=2,
    ),
    # getattr(__import__('os'), 'system')(cmd): no forbidden name appears as a plain global.
    "getattr chain": (f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V{touch}\ntR.".encode()),
  }


@pytest.mark.parametrize("case", list(_hostile_pickles(Path("marker"))))
def test_hostile_pickle_is_refused_without_running(tmp_path, case):
  marker = tmp_path / "pwned"
  checkpoint = _make_zip(tmp_path / "evil.pth", {"evil/data.pkl": _hostile_pickles(marker)[case]})
  with pytest.raises(UnsafeCheckpointError) as error:
    read_pth(checkpoint)
  assert str(checkpoint) in str(error.value)
  assert "which is not a tensor or plain data" in str(error.value)
  assert not marker.exists()


def test_unsafe_message_names_the_global(tmp_path):
  hostile = _hostile_pickles(tmp_path / "marker")["os.system"]
  checkpoint = _make_zip(tmp_path / "x.pth", {"x/data.pkl": hostile})
  message = r"refusing to load '.*x\.pth': it references os\.system, which is not a tensor"
  with pytest.raises(UnsafeCheckpointError, match=message):
    read_pth(checkpoint)


# --- damaged files -----------------------------------------------------------------------------


def _tensor_checkpoint(tmp_path: Path, numel: int, offset: int, size: tuple, stride: tuple) -> Path:
  """A one-tensor checkpoint with a hand-made pickle, so that the geometry can be anything."""
  ints = lambda values: "(" + "".join(f"I{v}\n" for v in values) + "t"  # noqa: E731
  pickled = (
    "ctorch._utils\n_rebuild_tensor_v2\n("
    f"(Vstorage\nctorch\nFloatStorage\nV0\nVcuda:0\nI{numel}\ntQ"  # saved from a GPU
    f"I{offset}\n{ints(size)}{ints(stride)}I00\n(dtR."
  )
  storage = np.arange(numel, dtype=np.float32).tobytes()
  return _make_zip(tmp_path / "t.pth", {"t/data.pkl": pickled.encode(), "t/data/0": storage})


def test_hand_made_tensor_reads(tmp_path):
  """Checks the helper, so that the errors below come from the geometry alone."""
  got = read_pth(_tensor_checkpoint(tmp_path, numel=6, offset=1, size=(2, 2), stride=(1, 2)))
  np.testing.assert_array_equal(got, [[1, 3], [2, 4]])


@pytest.mark.parametrize(
  "numel, offset, size, stride",
  [
    (6, 0, (3, 3), (2, 1)),  # reaches element 6
    (6, 6, (1,), (1,)),  # starts past the end
    (6, 5, (2,), (-1,)),  # negative stride
    (6, 0, (2,), (1, 1)),  # size and stride disagree
    (6, 0, (2,), (2**62,)),  # far past the end
  ],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, numel, offset, size, stride):
  """as_strided would read whatever memory such numbers point at."""
  path = _tensor_checkpoint(tmp_path, numel, offset, size, stride)
  with pytest.raises(CheckpointFormatError, match="t.pth"):
    read_pth(path)


def _damaged(tmp_path: Path, kind: str) -> Path:
  path = tmp_path / f"{kind}.pth"
  good = REFERENCE / "checkpoint.pth"
  if kind == "truncated":
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
  elif kind == "random":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif kind == "empty":
    path.write_bytes(b"")
  elif kind == "no data.pkl":
    _make_zip(path, {"archive/version": b"3\n", "archive/data/0": b"\0" * 8})
  elif kind == "short storage":
    records = _records(good)
    records["checkpoint/data/3"] = records["checkpoint/data/3"][:-1]
    _make_zip(path, records)
  elif kind == "missing storage":
    records = _records(good)
    del records["checkpoint/data/3"]
    _make_zip(path, records)
  elif kind == "corrupt pickle":
    records = _records(good)
    records["checkpoint/data.pkl"] = records["checkpoint/data.pkl"][:100]
    _make_zip(path, records)
  elif kind == "flipped storage byte":  # caught by the zip's CRC
    data = bytearray(good.read_bytes())
    data[data.index(_records(good)["checkpoint/data/3"][:64])] ^= 1
    path.write_bytes(bytes(data))
  return path


@pytest.mark.parametrize(
  "kind",
  [
    "truncated",
    "random",
    "empty",
    "no data.pkl",
    "short storage",
    "missing storage",
    "corrupt pickle",
    "flipped storage byte",
  ],
)
def test_damaged_file_gives_format_error_naming_it(tmp_path, kind):
  path = _damaged(tmp_path, kind)
  with pytest.raises(CheckpointFormatError) as error:
    read_pth(path)
  assert str(path) in str(error.value)


# --- writing -----------------------------------------------------------------------------------

_DTYPES = [
  np.float32,
  np.float16,
  ml_dtypes.bfloat16,
  np.int64,
  np.bool_,
  np.float64,
  np.int32,
  np.int16,
  np.int8,
  np.uint8,
]


def _random_array(dtype, shape, rng) -> np.ndarray:
  """Random bits (NaN payloads, subnormals, ...); bools only 0 or 1, as numpy and torch store them."""
  if dtype is np.bool_:
    return np.asarray(rng.random(shape) < 0.5)
  n = int(np.prod(shape)) * np.dtype(dtype).itemsize
  return np.frombuffer(rng.bytes(n), dtype).reshape(shape).copy()


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_is_bit_exact(tmp_path, dtype):
  rng = np.random.default_rng(0)
  shapes = [(), (0,), (2, 0, 3), (7,), (3, 4, 5)]
  arrays = {str(shape): _random_array(dtype, shape, rng) for shape in shapes}
  write_pth(tmp_path / "x.pth", arrays)
  _assert_same_arrays(read_pth(tmp_path / "x.pth"), arrays)


def test_round_trip_of_containers_and_plain_values(tmp_path):
  obj = {
    "model": collections.OrderedDict(w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32)),
    "plain": [1, -2.5, "x", None, True, (3, "four")],
    "nested": {"deeper": {"a": np.array(7)}},
    1: "int key",
  }
  write_pth(tmp_path / "x.pth", obj)
  got = read_pth(tmp_path / "x.pth")
  assert type(got) is dict and type(got["model"]) is collections.OrderedDict
  assert list(got["model"]) == ["w", "b"]
  _assert_same_arrays(got["model"], obj["model"])
  assert got["plain"] == obj["plain"] and got[1] == "int key"
  _assert_same_arrays(got["nested"]["deeper"], obj["nested"]["deeper"])


def test_views_and_byte_orders_are_written_as_plain_tensors(tmp_path):
  base = np.arange(12, dtype=np.float64).reshape(3, 4)
  obj = {"transposed": base.T, "strided": base[::2, 1:], "big_endian": base.astype(">f8"), "same": base}
  obj["again"] = obj["same"]
  write_pth(tmp_path / "x.pth", obj)
  got = read_pth(tmp_path / "x.pth")
  _assert_same_arrays(got, {k: np.ascontiguousarray(v, np.float64) for k, v in obj.items()})
  storages = [n for n in _records(tmp_path / "x.pth") if "/data/" in n]
  assert len(storages) == 4  # an array given twice is written once, as torch writes a shared tensor


@pytest.mark.parametrize(
  "torch_file", [TORCH_MADE / "dtypes.pth", REFERENCE / "checkpoint.pth"], ids=["dtypes", "reference"]
)
def test_rewriting_a_torch_file_reproduces_it(tmp_path, torch_file):
  """Layout, pickle and storages as torch.save writes them, byte for byte."""
  path = tmp_path / torch_file.name
  write_pth(path, read_pth(torch_file))
  ours, torchs = _records(path), _records(torch_file)
  del torchs[f"{torch_file.stem}/.data/serialization_id"]  # torch.load does not need it
  assert list(ours) == list(torchs)
  assert ours == torchs
  assert ours[f"{torch_file.stem}/version"] == b"3\n"


def test_records_are_64_byte_aligned_and_uncompressed(tmp_path):
  path = tmp_path / "my.model.pth"
  write_pth(path, {f"w{i}": np.ones(i, np.float32) for i in range(20)})
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as zf:
    assert {name.split("/")[0] for name in zf.namelist()} == {"my.model"}  # torch's archive name
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_write_replaces_atomically(tmp_path, monkeypatch):
  path = tmp_path / "x.pth"
  write_pth(path, {"old": np.zeros(2)})
  write_pth(path, {"new": np.ones(2)})
  assert list(read_pth(path)) == ["new"]

  def crash(f, archive, records):
    f.write(b"half a checkpoint")
    raise KeyboardInterrupt

  monkeypatch.setattr("vim_jax.pth._write_zip", crash)
  with pytest.raises(KeyboardInterrupt):
    write_pth(path, {"newer": np.ones(2)})
  assert list(read_pth(path)) == ["new"]
  assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]  # no temporary file left behind


@pytest.mark.parametrize(
  "value, where",
  [
    (np.float32(1.0), "obj['a']"),  # a numpy scalar, not a 0-d array
    (np.zeros(2, np.complex64), "obj['a']"),
    (np.zeros(2, np.uint16), "obj['a']"),
    ([1, {2, 3}], "obj['a'][1]"),
    (object(), "obj['a']"),
  ],
)
def test_write_refuses_what_torch_weights_only_cannot_read(tmp_path, value, where):
  with pytest.raises(TypeError, match=re.escape(where)):
    write_pth(tmp_path / "x.pth", {"a": value})
  assert not list(tmp_path.iterdir())
