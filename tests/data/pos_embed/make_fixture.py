"""Makes bicubic.npz: torch's bicubic interpolate (align_corners=False) of random grids.

Run with torch installed (made with torch 2.13.0+cpu): python make_fixture.py
"""
import numpy as np
import torch
import torch.nn.functional as F

rng = np.random.default_rng(0)
out = {}
for (h, w), (nh, nw) in [((4, 4), (7, 7)), ((14, 14), (27, 27)), ((5, 3), (2, 4)), ((6, 6), (6, 6))]:
  grid = rng.normal(size=(h, w, 8)).astype(np.float64)
  t = torch.from_numpy(grid).permute(2, 0, 1)[None]
  res = F.interpolate(t, size=(nh, nw), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
  out[f"in_{h}x{w}_{nh}x{nw}"] = grid
  out[f"out_{h}x{w}_{nh}x{nw}"] = res
np.savez_compressed("bicubic.npz", **out)
