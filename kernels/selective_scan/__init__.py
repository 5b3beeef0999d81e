"""Selective scan (Mamba S6): one public entry point over interchangeable implementations."""

from kernels.selective_scan.api import IMPLS, Direction, selective_scan, selective_scan_bidirectional

__all__ = ["IMPLS", "Direction", "selective_scan", "selective_scan_bidirectional"]
