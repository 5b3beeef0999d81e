"""Input pipelines: RASampler semantics, ImageNet (a tiny real TFDS array_record folder) and the digits.

The fake ImageNet is written by TFDS's own builder machinery (a `GeneratorBasedBuilder` named imagenet2012
with the real features, prepared as array_record), which works without TensorFlow and without the network,
so `tfds.data_source` reads it exactly as it reads the real folder.
"""

from __future__ import annotations

import io
import math
import time

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vim_jax.data import augment, pipeline, sources

IMAGE_SIZE = 32
FAKE_TRAIN, FAKE_EVAL = 300, 7  # 300 >= 256, so RASampler draws 256 per epoch on one process


def make_config(name: str, **data) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 16
  config.eval_batch_size = 8
  config.data = ml_collections.ConfigDict(
    dict(
      name=name,
      data_dir=None,
      train_split="train",
      eval_split="validation",
      image_size=IMAGE_SIZE,
      repeated_aug=3,
      num_workers=0,
      prefetch=2,
    )
  )
  config.data.update(data)
  config.aug = ml_collections.ConfigDict(
    dict(
      scale=(0.08, 1.0),
      ratio=(3 / 4, 4 / 3),
      hflip=0.5,
      randaugment="rand-m9-mstd0.5-inc1",
      re_prob=0.25,
      eval_crop_ratio=0.875,
    )
  )
  return config


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def assert_resumes_identically(config, *, skip: int, process_index: int, process_count: int) -> None:
  """After `skip` batches, a fresh iterator restored from get_state() yields the next 2 batches unchanged."""
  iterator = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count)
  take(iterator, skip)
  state = iterator.get_state()
  expected = take(iterator, 2)
  resumed = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), expected)


# ------------------------------------------------------------------------------------------------
# RASampler


def official_rasampler(order: np.ndarray, repeats: int, world: int, rank: int) -> list[int]:
  """vim/samplers.py RASampler.__iter__ (DeiT) with `order` in place of torch.randperm; repeats=1 mirrors
  torch DistributedSampler (drop_last=False) as main.py uses it when repeated augmentation is off."""
  n = len(order)
  num_samples = math.ceil(n * repeats / world)
  total = num_samples * world
  indices = np.repeat(order, repeats).tolist()
  indices += indices[: total - len(indices)]
  selected = math.floor(n // 256 * 256 / world) if repeats > 1 else num_samples
  return indices[rank:total:world][:selected]


@pytest.mark.parametrize(
  "num_examples, repeats, world", [(1000, 3, 1), (1000, 3, 2), (1281, 3, 8), (700, 2, 3), (1000, 1, 3), (10, 1, 4)]
)
def test_rasampler_matches_official(num_examples, repeats, world):
  per_process = pipeline.samples_per_process(num_examples, repeats, world)
  for rank in range(world):
    sampler = pipeline.RepeatedAugSampler(num_examples, repeats, 7, rank, world, per_process)
    for epoch in range(2):
      order = pipeline._permutation(num_examples, 7, epoch)
      got = [sampler(epoch * per_process + j)[1] for j in range(per_process)]
      assert got == official_rasampler(order, repeats, world, rank)


def test_rasampler_epoch_structure():
  n, repeats, world = 1000, 3, 2
  per_process = pipeline.samples_per_process(n, repeats, world)
  assert per_process == 1000 // 256 * 256 // world == 384  # truncation: ~1/3 of the unique images per epoch
  samplers = [pipeline.RepeatedAugSampler(n, repeats, 0, r, world, per_process) for r in range(world)]
  epochs = []
  for epoch in range(2):
    drawn = [[s(epoch * per_process + j) for j in range(per_process)] for s in samplers]
    positions = sorted(p for process in drawn for p, _ in process)
    # Global positions (the augmentation seeds) are disjoint across processes and cover the epoch's slots.
    assert positions == list(range(epoch * world * per_process, (epoch + 1) * world * per_process))
    counts = np.bincount([i for process in drawn for _, i in process], minlength=n)
    selected = np.flatnonzero(counts)
    assert len(selected) == math.ceil(world * per_process / repeats)
    # Every selected image appears `repeats` times, except the one cut by the truncation.
    assert np.sum(counts[selected] != repeats) <= 1 and counts.max() == repeats
    # The copies of an image are spread over the processes (all but the cut image reach both).
    assert len({i for _, i in drawn[0]} ^ {i for _, i in drawn[1]}) <= 1
    epochs.append(set(selected))
  assert epochs[0] != epochs[1]


def test_samples_per_process_too_small_raises():
  config = make_config("digits", repeated_aug=3)
  config.batch_size = 2048  # more than the 1,280 samples RASampler draws from 1,497 digits
  with pytest.raises(ValueError, match="less than one batch"):
    pipeline.steps_per_epoch(config, process_count=1)


# ------------------------------------------------------------------------------------------------
# Fake ImageNet in the real TFDS layout


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> str:
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  class FakeImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "imagenet2012"
    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
          "file_name": tfds.features.Text(),
        }
      )
      return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(FAKE_TRAIN, 0), "validation": self._generate_examples(FAKE_EVAL, 1)}

    def _generate_examples(self, count, seed):
      rng = np.random.default_rng(seed)
      for i in range(count):
        shape = (int(rng.integers(24, 64)), int(rng.integers(24, 64)), 3)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="JPEG")
        yield f"{seed}-{i}", {"image": buffer.getvalue(), "label": (37 * i + seed) % 1000, "file_name": f"{i}.JPEG"}

  data_dir = tmp_path_factory.mktemp("tfds")
  FakeImagenet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_imagenet_batches(imagenet_dir):
  config = make_config("imagenet2012", data_dir=imagenet_dir)
  assert pipeline.dataset_info(config) == sources.DatasetInfo(FAKE_TRAIN, FAKE_EVAL, 1000, IMAGE_SIZE)
  assert pipeline.steps_per_epoch(config, process_count=1) == 256 // 16
  source = sources.open_source(config, "train")
  batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert np.all((batch["label"] >= 0) & (batch["label"] < 1000))
  sampler = pipeline.RepeatedAugSampler(FAKE_TRAIN, 3, 0, 0, 1, 256)
  assert batch["label"].tolist() == [source[sampler(j)[1]]["label"] for j in range(16)]
  assert np.all(np.isfinite(batch["image"]))
  config.aug.re_prob = 0.0  # random erasing draws N(0, 1) pixels; without it values lie in the normalized [0, 1]
  images = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))["image"]
  low = (0 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD
  high = (1 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD
  assert np.all((images >= low - 1e-5) & (images <= high + 1e-5)) and images.std() > 0.1

  # Eval: the exact normalized center crops, in order, padding masked.
  (evaluation,) = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
  assert evaluation["mask"].tolist() == [1] * FAKE_EVAL + [0]
  eval_source = sources.open_source(config, "validation")
  for i in range(FAKE_EVAL):
    expected = augment.eval_transform(eval_source[i]["image"], image_size=IMAGE_SIZE, crop_ratio=0.875)
    np.testing.assert_array_equal(evaluation["image"][i], expected)
    assert evaluation["label"][i] == eval_source[i]["label"]


def test_imagenet_sharding_determinism_resume(imagenet_dir):
  config = make_config("imagenet2012", data_dir=imagenet_dir)
  source = sources.open_source(config, "train")
  per_process = pipeline.steps_per_epoch(config, process_count=2) * 8
  labels = []
  for rank in range(2):
    batches = take(pipeline.make_train_iterator(config, process_index=rank, process_count=2), 2)
    sampler = pipeline.RepeatedAugSampler(FAKE_TRAIN, 3, 0, rank, 2, per_process)
    assert [b["image"].shape[0] for b in batches] == [8, 8]
    assert np.concatenate([b["label"] for b in batches]).tolist() == [source[sampler(j)[1]]["label"] for j in range(16)]
    labels.append(batches)
  # Copies of an image go to the two processes with different augmentations.
  assert labels[0][0]["label"][0] == labels[1][0]["label"][0]
  assert not np.array_equal(labels[0][0]["image"][0], labels[1][0]["image"][0])

  first = pipeline.make_train_iterator(config, process_index=1, process_count=2)
  assert_batches_equal(take(first, 2), labels[1])
  assert_resumes_identically(config, skip=2, process_index=1, process_count=2)


def test_missing_imagenet_fails_fast_with_instructions(tmp_path):
  config = make_config("imagenet2012", data_dir=str(tmp_path / "nowhere"))
  start = time.perf_counter()
  for make in (pipeline.dataset_info, pipeline.make_train_iterator, pipeline.make_eval_iterator):
    with pytest.raises(FileNotFoundError) as error:
      make(config)
    message = str(error.value)
    assert "tfds build imagenet2012" in message and "--file_format=array_record" in message
    assert f"--data_dir={tmp_path / 'nowhere'}" in message and "--manual_dir=" in message
  assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------------
# Digits


def digits_config(**data) -> ml_collections.ConfigDict:
  config = make_config("digits", **({"repeated_aug": 1} | data))
  config.aug.update(dict(scale=(0.5, 1.0), hflip=0.0, randaugment=None, re_prob=0.0))
  return config


def test_digits_info():
  config = digits_config()
  assert pipeline.dataset_info(config) == sources.DatasetInfo(1497, 300, 10, IMAGE_SIZE)
  assert pipeline.steps_per_epoch(config, process_count=1) == 1497 // 16
  assert pipeline.steps_per_epoch(digits_config(repeated_aug=3), process_count=2) == 1280 // 2 // 8
  train, evaluation = sources.digits_source("train", IMAGE_SIZE), sources.digits_source("validation", IMAGE_SIZE)
  assert train.images.shape == (1497, IMAGE_SIZE, IMAGE_SIZE, 3) and train.images.dtype == np.uint8
  assert set(np.unique(evaluation.labels)) == set(range(10))
  assert train.images.max() > 200


@pytest.mark.parametrize("process_count", [1, 2])
def test_digits_eval_counts_every_example_once(process_count):
  config = digits_config()
  config.eval_batch_size = 64
  source = sources.digits_source("validation", IMAGE_SIZE)
  seen = []
  lengths = set()
  for rank in range(process_count):
    batches = list(pipeline.make_eval_iterator(config, process_index=rank, process_count=process_count))
    lengths.add(len(batches))
    for batch in batches:
      assert batch["image"].shape == (64 // process_count, IMAGE_SIZE, IMAGE_SIZE, 3)
      for image, label, mask in zip(batch["image"], batch["label"], batch["mask"]):
        if mask:
          seen.append((label, image))
  assert len(lengths) == 1  # every process runs the same number of eval steps
  assert len(seen) == 300
  expected = sorted(range(300), key=lambda i: (i % process_count, i))
  for (label, image), i in zip(seen, expected):
    assert label == source.labels[i]
    np.testing.assert_array_equal(image, augment.eval_transform(source.images[i], image_size=IMAGE_SIZE))


def test_digits_train_determinism_and_resume():
  config = digits_config()
  a = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
  b = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
  assert_batches_equal(a, b)
  config.seed = 1
  c = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
  assert not np.array_equal(a[0]["label"], c["label"])

  # Resume across an epoch boundary (93 steps per epoch).
  config.seed = 0
  assert_resumes_identically(config, skip=92, process_index=0, process_count=1)


def test_digits_workers_match_in_process_and_restore_with_orbax_handler(tmp_path):
  config = digits_config()
  in_process = take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 6)
  config.data.num_workers = 2
  iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  assert_batches_equal(take(iterator, 3), in_process[:3])
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "data").mkdir()  # orbax makes it when the handler runs inside a CheckpointManager
  handler.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(iterator))
  restored = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  handler.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(restored))
  assert_batches_equal(take(restored, 3), in_process[3:])
  evaluation = list(pipeline.make_eval_iterator(config, process_index=0, process_count=1))
  assert sum(int(b["mask"].sum()) for b in evaluation) == 300
