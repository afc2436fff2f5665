"""Simulator speed: HRTEM frames (512², partial coherence) within a 20-frame series; exit wave.

Run: ``.venv/bin/python benchmarks/simulate.py [--size 512] [--n 20] [--repeat 3]``.
Prints one JSON object. Goal (issue 2): ≤ 20 ms per 512² HRTEM frame within a 20-frame series on
2 cores (the exit wave is computed once per specimen and reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from scherzer.simulators.hrtem import HRTEMImager, default_hrtem_optics
from scherzer.simulators.specimen import make_specimen


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--pixel-nm", type=float, default=0.02)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--specimen", default="crystal_edge")
    args = ap.parse_args()

    size, n, px, m = args.size, args.n, args.pixel_nm, args.margin
    field = ((size + 2 * m) * px,) * 2
    t0 = time.perf_counter()
    specimen = make_specimen(args.specimen, field, seed=0)
    t_spec = time.perf_counter() - t0
    optics = default_hrtem_optics()
    imager = HRTEMImager(specimen, optics, (size, size), px, margin_px=m)
    rng = np.random.default_rng(0)
    defoci = -150.0 + 10.0 * np.arange(n)
    shifts_nm = np.column_stack([0.7 * np.arange(n), -0.4 * np.arange(n)]) * px

    # warm-up (numba compilation, FFT plans)
    clean = imager.noiseless(defoci[:2], shifts_nm[:2])
    imager.camera.expose(clean[0], 500.0, px, rng)

    t_noiseless = _best(lambda: imager.noiseless(defoci, shifts_nm), args.repeat)
    clean = imager.noiseless(defoci, shifts_nm)
    t_camera = _best(lambda: [imager.camera.expose(c, 500.0, px, rng) for c in clean], args.repeat)
    t_live = _best(lambda: imager.frame(-60.0, (0.1, -0.05), 500.0, rng), args.repeat)
    focus = iter(np.linspace(-40.0, 40.0, args.repeat))
    t_single = _best(lambda: imager.frame(next(focus), (0.1, -0.05), 500.0, rng), args.repeat)
    inco = HRTEMImager(specimen, optics, (size, size), px, margin_px=m, coherence="incoherent")
    t_inco = _best(lambda: inco.noiseless(defoci[:4], shifts_nm[:4]), 1) / 4

    per_frame = (t_noiseless + t_camera) / n
    print(
        json.dumps(
            {
                "benchmark": "hrtem_simulation",
                "frame_size": [size, size],
                "field_with_margin": list(imager.big_shape),
                "n_frames": n,
                "specimen": args.specimen,
                "n_atoms": len(specimen.numbers),
                "specimen_build_s": round(t_spec, 3),
                "exit_wave_multislice_s": round(imager.exit_wave_seconds, 3),
                "series_ms_per_frame": round(per_frame * 1e3, 2),
                "noiseless_ms_per_frame": round(t_noiseless / n * 1e3, 2),
                "camera_ms_per_frame": round(t_camera / n * 1e3, 2),
                "single_frame_new_focus_ms": round(t_single * 1e3, 2),
                "single_frame_same_focus_ms": round(t_live * 1e3, 2),
                "incoherent_focal_ms_per_frame": round(t_inco * 1e3, 2),
                "goal_ms_per_frame": 20.0,
                "meets_goal": per_frame * 1e3 <= 20.0,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
