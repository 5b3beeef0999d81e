"""Accelerator kernels for vim_jax (the selective scan)."""

from kernels.selective_scan import Direction, selective_scan, selective_scan_bidirectional

__all__ = ["Direction", "selective_scan", "selective_scan_bidirectional"]
