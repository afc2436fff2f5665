"""quantem's drift correction as a peer of benchmarks/scan_distortion.py, run in its own Python.

quantem (PyPI) pulls in torch (≈6 GB with CUDA wheels), so it lives in a throwaway venv, never in
.venv or .venv-bench; this worker imports numpy and quantem only (not scherzer):

    python -m venv /tmp/qvenv && /tmp/qvenv/bin/pip install quantem      # ≈5 min measured
    .venv-bench/bin/python benchmarks/scan_distortion.py --quantem-python /tmp/qvenv/bin/python

The benchmark writes the frames as acquired (fast axis along rows) and their scan angles to an
.npz; this worker runs quantem's documented sequence (``DriftCorrection.from_data(...)
.preprocess()``, ``align_affine``, ``align_nonrigid``, ``generate_corrected_image``) with its
defaults and writes the merged image (float32 .npy) and the seconds it took.

    python benchmarks/scan_distortion_quantem.py IN.npz OUT.npy [--sign -1]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", help=".npz with frames (n, y, x) and rotations_deg (n,)")
    parser.add_argument("output", help="merged image (.npy, float32)")
    parser.add_argument("--sign", type=float, default=1.0, help="sign of the scan angles")
    args = parser.parse_args()
    from quantem.imaging.drift import DriftCorrection

    data = np.load(args.inputs)
    frames = [np.asarray(f, dtype=np.float64) for f in data["frames"]]
    angles = args.sign * np.asarray(data["rotations_deg"], dtype=float)
    t0 = time.perf_counter()
    drift = DriftCorrection.from_data(images=frames, scan_direction_degrees=angles).preprocess()
    drift.align_affine(show_merged=False)
    drift.align_nonrigid(show_merged=False)
    image = drift.generate_corrected_image(show_image=False)
    seconds = time.perf_counter() - t0
    array = np.asarray(getattr(image, "array", image), dtype=np.float32)
    np.save(args.output, array)
    print(json.dumps({"seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
