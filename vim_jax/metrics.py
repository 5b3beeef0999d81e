"""Training metrics: TensorBoard events, `metrics.jsonl` (one JSON object per logged step), a progress bar.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import tqdm


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX: no TensorFlow needed) and to `metrics.jsonl`."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      workdir = Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115  line-buffered

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """Console progress: steps, images/s and ETA (tqdm), shown on process 0 only."""

  def __init__(self, *, total_steps: int, start_step: int, global_batch: int):
    self._bar = tqdm.tqdm(
      total=total_steps, initial=start_step, disable=jax.process_index() != 0, unit="step", dynamic_ncols=True
    )
    self._global_batch = global_batch
    self._last_time = time.perf_counter()
    self._last_step = start_step

  def update(self, step: int, scalars: dict[str, float]) -> float:
    """Advance to `step`; returns images/s since the previous update."""
    now = time.perf_counter()
    images_per_sec = (step - self._last_step) * self._global_batch / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    shown = {k: f"{v:.4g}" for k, v in scalars.items() if math.isfinite(v)}
    self._bar.set_postfix(shown | {"img/s": f"{images_per_sec:.0f}"}, refresh=False)
    self._bar.update(step - self._bar.n)
    return images_per_sec

  def write(self, message: str) -> None:
    self._bar.write(message)

  def close(self) -> None:
    self._bar.close()
