"""Accelerator kernels for vim_jax: the selective scan, the conv + SiLU before it, and x_proj and dt_proj between."""

from kernels.conv_silu import conv_silu_bidirectional
from kernels.selective_scan import Columns, Direction, selective_scan, selective_scan_bidirectional

__all__ = ["Columns", "Direction", "conv_silu_bidirectional", "selective_scan", "selective_scan_bidirectional"]
