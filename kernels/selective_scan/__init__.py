"""Selective scan (Mamba S6): one public entry point over interchangeable implementations."""

from kernels.selective_scan.api import IMPLS, Direction, selective_scan, selective_scan_bidirectional
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.negative_exp import NegativeExp

__all__ = ["IMPLS", "Columns", "Direction", "NegativeExp", "selective_scan", "selective_scan_bidirectional"]
