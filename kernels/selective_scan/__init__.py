"""Selective scan (Mamba S6): one public entry point over interchangeable implementations."""

from kernels.selective_scan.api import IMPLS, Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan.columns import Columns

__all__ = ["IMPLS", "Columns", "Direction", "selective_scan", "selective_scan_bidirectional"]
