"""Selective scan (Mamba S6): one public entry point over interchangeable implementations."""

from kernels.selective_scan.api import IMPLS, Direction, projects_delta, selective_scan, selective_scan_bidirectional
from kernels.selective_scan.columns import Columns
from kernels.selective_scan.negative_exp import NegativeExp
from kernels.selective_scan.projected_delta import ProjectedDelta

__all__ = [
  "IMPLS",
  "Columns",
  "Direction",
  "NegativeExp",
  "ProjectedDelta",
  "projects_delta",
  "selective_scan",
  "selective_scan_bidirectional",
]
