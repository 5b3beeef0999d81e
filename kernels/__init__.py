"""Accelerator kernels for vim_jax: the selective scan, the conv + SiLU before it, and x_proj and dt_proj between."""

from kernels.conv_silu import conv_silu_bidirectional
from kernels.selective_scan import Columns, Direction, NegativeExp, selective_scan, selective_scan_bidirectional

__all__ = [
  "Columns",
  "Direction",
  "NegativeExp",
  "conv_silu_bidirectional",
  "selective_scan",
  "selective_scan_bidirectional",
]
