"""Selective scan (Mamba S6): one public entry point over interchangeable implementations."""

from kernels.selective_scan.api import IMPLS, selective_scan

__all__ = ["IMPLS", "selective_scan"]
