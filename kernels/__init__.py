"""Accelerator kernels for vim_jax: the selective scan, the conv + SiLU before it, x_proj and dt_proj between,
and the residual add + RMSNorm between blocks."""

from kernels import add_norm
from kernels.conv_silu import conv_silu_bidirectional
from kernels.selective_scan import Columns, Direction, NegativeExp, selective_scan, selective_scan_bidirectional

__all__ = [
  "Columns",
  "Direction",
  "NegativeExp",
  "add_norm",
  "conv_silu_bidirectional",
  "selective_scan",
  "selective_scan_bidirectional",
]
