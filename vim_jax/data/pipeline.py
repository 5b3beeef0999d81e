"""Train and eval input pipelines (grain) for one process of a possibly multi-host job.

Every batch is a pure function of (config, process, position in the stream): the sampler is a random-access
index map, and each example is augmented with a generator seeded by (config.seed, its global stream
position). So the iterator state is a counter (one per worker process), a restored iterator continues
bit-identically, and the batches do not depend on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from vim_jax.data import augment
from vim_jax.data.sources import DatasetInfo, Source, dataset_info, open_source

__all__ = [
  "DatasetInfo",
  "RepeatedAugSampler",
  "dataset_info",
  "make_eval_iterator",
  "make_train_iterator",
  "samples_per_process",
  "steps_per_epoch",
]

_PERMUTATION_STREAM, _AUGMENT_STREAM = 0, 1  # keep the two uses of config.seed apart


def samples_per_process(num_examples: int, repeats: int, process_count: int) -> int:
  """Samples each process draws per epoch, as the official samplers do.

  With repeated augmentation (`repeats` > 1) RASampler's `floor(len // 256 * 256 / world)`, so an epoch
  covers about 1/repeats of the unique images; without it DistributedSampler's `ceil(len / world)`.
  """
  if repeats > 1:
    return num_examples // 256 * 256 // process_count
  return math.ceil(num_examples / process_count)


@dataclasses.dataclass(frozen=True)
class RepeatedAugSampler:
  """The official RASampler (vim/samplers.py, from DeiT) as a map from a process's stream position.

  Epoch e shuffles all N examples (seeded by (seed, e)), repeats each index `repeats` times consecutively,
  pads the list cyclically to a multiple of the process count W, and process r takes positions r, r + W,
  r + 2W, ... of it, the first `epoch_length` of them. So the copies of an image go to consecutive
  processes (with W = 1, to the same or adjacent batches, as on one GPU), and an epoch sees ~N/repeats
  unique images. `epoch_length` is the per-process sample count rounded down to whole batches (the official
  loader's drop_last). `repeats=1` is DistributedSampler(shuffle=True). The permutation differs from
  torch's randperm; the structure is the same.

  Calling it with a process's stream position p (epoch p // epoch_length) gives
  `(global position, example index)`; the global position, unique over processes and epochs, seeds the
  example's augmentation.
  """

  num_examples: int
  repeats: int
  seed: int
  process_index: int
  process_count: int
  epoch_length: int

  def __call__(self, position: int) -> tuple[int, int]:
    epoch, offset = divmod(position, self.epoch_length)
    slot = offset * self.process_count + self.process_index  # in the epoch's repeated, padded list
    example = _permutation(self.num_examples, self.seed, epoch)[
      slot % (self.num_examples * self.repeats) // self.repeats
    ]
    return epoch * self.process_count * self.epoch_length + slot, int(example)


@functools.lru_cache(maxsize=2)  # the current epoch and, while threads straddle a boundary, its neighbour
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  order = np.random.default_rng((seed, _PERMUTATION_STREAM, epoch)).permutation(num_examples)
  order.setflags(write=False)
  return order


def steps_per_epoch(config, process_count: int | None = None) -> int:
  """Train batches per epoch (each process draws the same number)."""
  process_count = jax.process_count() if process_count is None else process_count
  return _steps_per_epoch(config, len(open_source(config, config.data.train_split)), process_count)


def _steps_per_epoch(config, num_examples: int, process_count: int) -> int:
  local_batch = _local_batch(config.batch_size, process_count)
  samples = samples_per_process(num_examples, config.data.repeated_aug, process_count)
  if samples < local_batch:
    raise ValueError(
      f"the {config.data.train_split!r} split of {num_examples} examples gives {samples} samples per process "
      f"per epoch (repeated_aug={config.data.repeated_aug}, {process_count} processes), less than one batch of "
      f"{local_batch}"
    )
  return samples // local_batch


def make_train_iterator(
  config, *, process_index: int | None = None, process_count: int | None = None, source: Source | None = None
) -> grain.DatasetIterator:
  """Endless `{"image": float32 (B, H, W, 3), "label": int32 (B,)}` batches of this process's share.

  B = config.batch_size // process_count. Save and restore it with `get_state()` / `set_state()` or orbax
  (`grain.checkpoint.CheckpointSave` / `CheckpointRestore`); restored, it yields the next batch. `source`
  replaces the train split of config.data (the benchmark feeds synthetic JPEGs).
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config.batch_size, process_count)
  source = open_source(config, config.data.train_split) if source is None else source
  epoch_length = _steps_per_epoch(config, len(source), process_count) * local_batch
  sampler = RepeatedAugSampler(
    len(source), config.data.repeated_aug, config.seed, process_index, process_count, epoch_length
  )
  augmentation = dict(
    image_size=config.data.image_size,
    scale=tuple(config.aug.scale),
    ratio=tuple(config.aug.ratio),
    hflip=config.aug.hflip,
    randaugment=config.aug.randaugment or None,
    re_prob=config.aug.re_prob,
  )
  examples = grain.MapDataset.range(sys.maxsize).map(_TrainExample(source, sampler, config.seed, augmentation))
  return _iterate(examples.batch(local_batch, drop_remainder=True), config.data)


def make_eval_iterator(
  config, *, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
  """One pass over this process's share (every process_count-th example) of the eval split.

  Batches `{"image", "label", "mask"}` of fixed size config.eval_batch_size // process_count, equally many
  on every process; padding examples have mask 0, so each eval example counts exactly once in total.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config.eval_batch_size, process_count)
  source = open_source(config, config.data.eval_split)
  num_batches = math.ceil(math.ceil(len(source) / process_count) / local_batch)
  example = _EvalExample(source, process_index, process_count, config.data.image_size, config.aug.eval_crop_ratio)
  examples = grain.MapDataset.range(num_batches * local_batch).map(example)
  return _iterate(examples.batch(local_batch), config.data)


@dataclasses.dataclass(frozen=True)
class _TrainExample:
  source: Source
  sampler: RepeatedAugSampler
  seed: int
  augmentation: dict[str, Any]

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    stream_position, index = self.sampler(position)
    record = self.source[index]
    rng = np.random.default_rng((self.seed, _AUGMENT_STREAM, stream_position))
    image = augment.train_transform(record["image"], rng, **self.augmentation)
    return {"image": image, "label": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class _EvalExample:
  source: Source
  process_index: int
  process_count: int
  image_size: int
  crop_ratio: float

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    index = position * self.process_count + self.process_index
    if index >= len(self.source):
      image = np.zeros((self.image_size, self.image_size, 3), np.float32)
      return {"image": image, "label": np.int32(0), "mask": np.float32(0)}
    record = self.source[index]
    image = augment.eval_transform(record["image"], image_size=self.image_size, crop_ratio=self.crop_ratio)
    return {"image": image, "label": np.int32(record["label"]), "mask": np.float32(1)}


def _iterate(batches: grain.MapDataset, data) -> grain.DatasetIterator:
  """Thread prefetch in-process, or `num_workers` processes that each make whole batches (b on worker b % n)."""
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker start reads an absl flag; outside absl.app, use the defaults
      flags.FLAGS.mark_as_parsed()
    single = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    options = grain.MultiprocessingOptions(num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch))
    return iter(single.mp_prefetch(options))
  threads = max(1, data.prefetch)
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by the {process_count} processes")
  return global_batch // process_count
