"""Accelerator kernels for vim_jax (the selective scan)."""

from kernels.selective_scan import selective_scan

__all__ = ["selective_scan"]
