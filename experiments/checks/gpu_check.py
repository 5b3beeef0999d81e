"""What the GPU checks (`scan_gpu_check.py`, `conv_silu_gpu_check.py`) share: errors and the verdict."""

import jax
import numpy as np


def relative_error(actual, expected) -> float:
  """Largest absolute difference relative to the largest expected magnitude, in float64."""
  actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


class Tally:
  """The worst error of a check, as a fraction of its tolerance; prints the device first and the verdict last."""

  def __init__(self):
    print(f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
    self.worst_ratio = 0.0

  def compare(self, actual, expected, tolerance: float):
    """(the relative error of every leaf, the worst of them), counted against `tolerance`."""
    errors = jax.tree.map(relative_error, actual, expected)
    worst = max(jax.tree.leaves(errors))
    self.worst_ratio = max(self.worst_ratio, worst / tolerance)
    return errors, worst

  def verdict(self) -> int:
    """Prints OK or FAILED and returns the exit status."""
    passed = self.worst_ratio <= 1
    print("OK" if passed else "FAILED", f"(worst error / tolerance = {self.worst_ratio:.2f})")
    return 0 if passed else 1
