"""Images/s of the train input pipeline alone: JPEG decode + the ImageNet recipe at 224 + batching.

  PYTHONPATH=. python experiments/benchmarks/input_pipeline.py --num-workers 0 2 --seconds 30 \\
      --out experiments/results/input_pipeline_cpu2

No ImageNet is needed: the source is a pool of synthetic JPEGs of ImageNet's typical size (500x375, ~100 KB,
smooth content plus noise), decoded with PIL on every read as TFDS does. The pipeline is the real one
(`make_train_iterator`: RASampler, RandomResizedCrop, flip, RandAugment m9, normalize, RandomErasing). It
also times decode and transform on one core, the basis for extrapolating to other hosts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from vim_jax.config_base import imagenet_config
from vim_jax.data import augment, pipeline


class SyntheticJpegs:
  """`count` JPEG-encoded (height, width) images held in memory; decoded on every read."""

  def __init__(self, count: int, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.jpegs = [_jpeg(rng, height, width) for _ in range(count)]
    self.labels = rng.integers(0, 1000, count)

  def __len__(self) -> int:
    return len(self.jpegs)

  def __getitem__(self, index: int) -> dict:
    image = np.asarray(Image.open(io.BytesIO(self.jpegs[index])).convert("RGB"))
    return {"image": image, "label": int(self.labels[index])}


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """Photo-like statistics (smooth regions and texture), so decode cost and file size resemble ImageNet's."""
  coarse = rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
  pixels = np.clip(smooth + rng.normal(0, 16, smooth.shape), 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def _per_image_ms(source: SyntheticJpegs, config, count: int = 100) -> dict[str, float]:
  """Single-core cost of one example, split into decode and augmentation."""
  kwargs = dict(
    image_size=config.data.image_size,
    scale=config.aug.scale,
    ratio=config.aug.ratio,
    hflip=config.aug.hflip,
    randaugment=config.aug.randaugment,
    re_prob=config.aug.re_prob,
  )
  start = time.perf_counter()
  images = [source[i % len(source)]["image"] for i in range(count)]
  decode = time.perf_counter() - start
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for image in images:
    augment.train_transform(image, rng, **kwargs)
  transform = time.perf_counter() - start
  return {"decode_ms": 1e3 * decode / count, "transform_ms": 1e3 * transform / count}


def _throughput(source: SyntheticJpegs, config, seconds: float) -> dict[str, float]:
  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(config, process_index=0, process_count=1, source=source)
  next(iterator)
  first = time.perf_counter() - start
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  elapsed = time.perf_counter() - start
  del iterator
  return {
    "num_workers": config.data.num_workers,
    "images_per_sec": batches * config.batch_size / elapsed,
    "batches": batches,
    "seconds": elapsed,
    "first_batch_s": first,
  }


def _cpu_model() -> str:
  for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def _markdown(report: dict) -> str:
  machine, setup, cost = report["machine"], report["setup"], report["per_image_single_core"]
  rows = "\n".join(
    f"| {r['num_workers']} | {r['images_per_sec']:.0f} | {r['batches']} | {r['first_batch_s']:.1f} |"
    for r in report["results"]
  )
  per_core = 1e3 / (cost["decode_ms"] + cost["transform_ms"])
  load = ", ".join(f"{x:.1f}" for x in machine["load_average_before"])
  return f"""# Train input pipeline throughput: {machine["cpu"]}, {machine["cores"]} cores

`PYTHONPATH=. python experiments/benchmarks/input_pipeline.py {setup["command_args"]}`

Pipeline alone (no model): synthetic {setup["jpeg_height"]}x{setup["jpeg_width"]} JPEGs (mean
{setup["jpeg_kb"]:.0f} KB, decoded with PIL {machine["pillow"]} on every read) -> RASampler -> the ImageNet train
recipe at {setup["image_size"]} (RandomResizedCrop, flip, RandAugment `{setup["randaugment"]}`, normalize,
RandomErasing {setup["re_prob"]}) -> float32 batches of {setup["batch_size"]}; grain {machine["grain"]}, about
{setup["seconds"]:.0f} s per setting after the first batch. Load average before the run: {load} (1, 5, 15 min).

| num_workers | images/s | batches | first batch (s, incl. worker start) |
|---|---|---|---|
{rows}

One core, one image (serial): decode {cost["decode_ms"]:.1f} ms + augmentation {cost["transform_ms"]:.1f} ms,
i.e. {per_core:.0f} images/s per core. With `num_workers` = 0 the batches are made by threads of one process,
which overlap only where PIL and NumPy release the GIL; worker processes are what scale with cores.

**Extrapolation to a 16-core GPU host (not measured):** the work is per image and independent, so it
scales with cores until memory bandwidth or the batch transfer binds. With `num_workers` = 15 (one core left
for the trainer) expect at most about 15 x {per_core:.0f} = {15 * per_core:.0f} images/s if its cores are
as fast as these (here {_scaling(report)}). Compare that with what the model consumes per host (global batch / step
time / hosts); if the pipeline is the bottleneck, use hosts with more cores per accelerator.
"""


def _scaling(report: dict) -> str:
  """How close the most parallel measured setting came to linear scaling of the single-core rate."""
  cost = report["per_image_single_core"]
  per_core = 1e3 / (cost["decode_ms"] + cost["transform_ms"])
  best = max(report["results"], key=lambda r: r["num_workers"])
  workers = max(best["num_workers"], 1)
  return (
    f"{best['num_workers']} workers on {report['machine']['cores']} cores reached "
    f"{best['images_per_sec'] / (workers * per_core):.0%} of {workers} x the single-core rate, the main process "
    "sharing the cores"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seconds", type=float, default=30.0)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--pool", type=int, default=256, help="distinct synthetic JPEGs (>= 256 for RASampler)")
  parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
  args = parser.parse_args()
  load = os.getloadavg()  # other work on the machine skews the numbers; recorded with them

  source = SyntheticJpegs(args.pool, height=375, width=500)
  config = imagenet_config("vim_tiny_patch16_224", batch_size=args.batch_size)
  config.data.image_size = args.image_size
  results = []
  for workers in args.num_workers:
    config.data.num_workers = workers
    results.append(_throughput(source, config, args.seconds))
    print(json.dumps(results[-1]), flush=True)
  report = {
    "machine": {
      "cpu": _cpu_model(),
      "cores": os.cpu_count(),
      "load_average_before": load,
      "python": platform.python_version(),
      "grain": metadata.version("grain"),
      "numpy": np.__version__,
      "pillow": PIL.__version__,
    },
    "setup": {
      "command_args": " ".join(
        f"--num-workers {' '.join(map(str, args.num_workers))} --batch-size {args.batch_size} "
        f"--seconds {args.seconds:g} --image-size {args.image_size} --pool {args.pool}".split()
      ),
      "batch_size": args.batch_size,
      "image_size": args.image_size,
      "seconds": args.seconds,
      "jpeg_height": 375,
      "jpeg_width": 500,
      "jpeg_kb": float(np.mean([len(j) for j in source.jpegs]) / 1e3),
      "randaugment": config.aug.randaugment,
      "re_prob": config.aug.re_prob,
      "prefetch": config.data.prefetch,
    },
    "per_image_single_core": _per_image_ms(source, config),
    "results": results,
  }
  print(json.dumps(report["per_image_single_core"]))
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(report))


if __name__ == "__main__":
  main()
