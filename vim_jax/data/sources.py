"""Random-access example sources: ImageNet-1k from a prepared TFDS folder, and the digits embedded in scikit-learn.

A source is a picklable sequence (`len`, `[index]`) of `{"image": uint8 (H, W, 3), "label": int}`, so grain can
read it from worker processes in any order. TensorFlow is not needed to read: TFDS decodes its array_record
files with PIL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

IMAGENET = "imagenet2012"
DIGITS = "digits"
DIGITS_NUM_EVAL = 300  # of the 1,797 digits; the other 1,497 are the train split
_DIGITS_SPLIT_SEED = 0
_DIGITS_EVAL_SPLITS = ("validation", "test")


class Source(Protocol):
  num_classes: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int
  num_eval: int
  num_classes: int
  image_size: int


class DatasetNotPreparedError(FileNotFoundError):
  """The TFDS folder is missing; raised before TFDS is touched, with the command that prepares it."""


def dataset_info(config) -> DatasetInfo:
  """Split sizes and classes of `config.data`, as the pipeline will read them."""
  train, evaluation = open_source(config, config.data.train_split), open_source(config, config.data.eval_split)
  return DatasetInfo(len(train), len(evaluation), train.num_classes, config.data.image_size)


def open_source(config, split: str) -> Source:
  """The source of `split` for `config.data.name` ("imagenet2012" or "digits")."""
  name = config.data.name
  if name == IMAGENET:
    return ImageNetSource(split, config.data.data_dir)
  if name == DIGITS:
    return digits_source(split, config.data.image_size)
  raise ValueError(f"unknown config.data.name {name!r}; expected {IMAGENET!r} or {DIGITS!r}")


def default_data_dir() -> Path:
  """TFDS's default: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def imagenet_data_dir(data_dir: str | os.PathLike | None) -> tuple[Path, str]:
  """`data_dir` (None = TFDS default) and the newest version prepared there; fails fast, before any TFDS call.

  TFDS would otherwise try to build the dataset (which needs TensorFlow and the manual tars) and bury the
  cause in a long traceback.
  """
  root = Path(data_dir).expanduser() if data_dir else default_data_dir()
  infos = [p for p in (root / IMAGENET).glob("*/dataset_info.json") if _version_key(p.parent.name) is not None]
  if not infos:
    raise DatasetNotPreparedError(
      f"The ImageNet dataset ({IMAGENET}) is not prepared in {root} "
      f"(no {root / IMAGENET}/<version>/dataset_info.json). Prepare it once, on a machine with TensorFlow "
      f"(`pip install tensorflow tensorflow-datasets`) and about as much free disk again as the two tars:\n"
      f"  tfds build {IMAGENET} --manual_dir=<dir with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar> "
      f"--data_dir={root} --file_format=array_record\n"
      f"then point config.data.data_dir at {root} (the folder that holds {IMAGENET}/)."
    )
  info = max(infos, key=lambda p: _version_key(p.parent.name))
  file_format = json.loads(info.read_text()).get("fileFormat", "tfrecord")
  if file_format != "array_record":
    raise DatasetNotPreparedError(
      f"{info.parent} holds {IMAGENET} as {file_format}, which needs TensorFlow to read; rebuild it as "
      f"array_record:\n  tfds build {IMAGENET} --manual_dir=<dir with ILSVRC2012_img_train.tar and "
      f"ILSVRC2012_img_val.tar> --data_dir={root} --file_format=array_record --overwrite"
    )
  return root, info.parent.name


def _version_key(name: str) -> tuple[int, ...] | None:
  parts = name.split(".")
  return tuple(map(int, parts)) if len(parts) == 3 and all(p.isdigit() for p in parts) else None


class ImageNetSource:
  """`tfds.data_source` of a prepared imagenet2012 split (array_record), returning only image and label."""

  def __init__(self, split: str, data_dir: str | os.PathLike | None):
    root, version = imagenet_data_dir(data_dir)
    import tensorflow_datasets as tfds  # only where ImageNet is read, and after the cheap check

    self._source = tfds.data_source(f"{IMAGENET}:{version}", split=split, data_dir=os.fspath(root))
    self.num_classes = self._source.dataset_info.features["label"].num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._source[index]
    return {"image": record["image"], "label": int(record["label"])}


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Examples held in memory (the digits)."""

  images: np.ndarray  # uint8 (N, H, W, 3)
  labels: np.ndarray  # int (N,)
  num_classes: int

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


@functools.cache
def digits_source(split: str, image_size: int) -> ArraySource:
  """scikit-learn's 1,797 8x8 digits (offline), 0..16 -> 0..255, bicubic to `image_size`, RGB.

  A fixed seeded permutation splits them: the first 300 are "validation" (alias "test"), the rest "train".
  """
  import PIL.Image
  from sklearn.datasets import load_digits

  if split != "train" and split not in _DIGITS_EVAL_SPLITS:
    raise ValueError(f"digits has splits 'train' and {' / '.join(map(repr, _DIGITS_EVAL_SPLITS))}, not {split!r}")
  digits = load_digits()
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(digits.target))
  chosen = order[DIGITS_NUM_EVAL:] if split == "train" else order[:DIGITS_NUM_EVAL]
  gray = np.round(digits.images[chosen] * (255 / 16)).astype(np.uint8)
  bicubic = PIL.Image.Resampling.BICUBIC
  resized = np.stack([np.asarray(PIL.Image.fromarray(g).resize((image_size, image_size), bicubic)) for g in gray])
  return ArraySource(np.repeat(resized[..., None], 3, axis=-1), digits.target[chosen].astype(np.int64), 10)
