"""Benchmark: time of one 512×512 STEM frame with two signals (HAADF + ABF), printed as JSON.

The object-space maps are built once per (specimen, optics) (reported separately); a frame is the
raster positions (with drift and jitter), one interpolation of both maps and Poisson noise.
Goal (issue 2): ≤ 50 ms per frame on 2 cores. Run: ``.venv/bin/python benchmarks/simulate_stem.py``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from scherzer.optics import Optics
from scherzer.simulators.specimen import make_specimen
from scherzer.simulators.stem import ScanRaster, STEMImager, constant_drift


def main(size: int = 512, repeats: int = 20) -> dict:
    pixel_nm = 0.02
    field = size * pixel_nm * 1.5
    spec = make_specimen("srtio3_001", (field, field), seed=0)
    t = time.perf_counter()
    imager = STEMImager(spec, Optics(voltage_kv=300.0), 25.0, ("HAADF", "ABF"))
    build_s = time.perf_counter() - t
    raster = ScanRaster(size, pixel_nm, 2.0, 100.0, 10.0, (field / 2.0, field / 2.0))
    drift = constant_drift((0.05, -0.03))
    rng = np.random.default_rng(0)
    imager.scan(raster, 0.0, drift, rng, jitter_px=0.2)  # JIT warm-up
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        imager.scan(raster, i * raster.frame_time_s, drift, rng, jitter_px=0.2)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    return {
        "benchmark": "stem_frame",
        "frame_px": [size, size],
        "signals": list(imager.signals),
        "map_px": list(imager.grid.shape),
        "map_build_s": round(build_s, 3),
        "frame_ms_median": round(float(np.median(ms)), 2),
        "frame_ms_min": round(float(ms.min()), 2),
        "goal_ms": 50.0,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
