"""Scale: cold start, big frames and memory, side by side with scikit-image (prints JSON).

Measured in separate processes so that every figure is a cold start of what a user runs:

* ``cold_align``: ``scherzer align`` on a 16 × 512² TIFF from the shell (wall seconds, peak RSS),
  against a plain Python script that reads the same TIFF and registers every frame to the first
  with scikit-image's ``phase_cross_correlation`` (the cheapest useful peer);
* ``big_align``: in-process alignment of 16 × N² (N = 1024, 2048; 4096 with ``--huge``) against
  scikit-image, each in its own process (seconds, peak RSS over the frames' size, RMS error
  against the known shifts);
* ``focal``: ``scherzer restore`` from the shell on simulated focal series 11 × 512², 11 × 1024²
  and 20 × 512² (wall seconds and the pipeline's own ``seconds``).

Inputs are the real SrTiO3 STEM image (../shared/testdata/ncempy/16_STOimage_1.ser) drifted by a
known sub-pixel random walk (enlarged by cubic interpolation for the larger sizes), and the
simulator's crystal edge for the focal series.
Run with ``python benchmarks/scale.py [--huge]``; not a test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata" / "ncempy" / "16_STOimage_1.ser"
PY = sys.executable
SCHERZER = [PY, "-m", "scherzer"]
TIME = shutil.which("time") or "/usr/bin/time"  # GNU time: the peak RSS of one process


def _measured(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MB) of one child process (GNU time's %M); its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run([TIME, "-f", "PEAK_KB %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return {"wall_s": round(wall, 3), "peak_mb": round(peak_kb / 1024, 1), "stdout": proc.stdout}


def _series(n: int, size: int, seed: int, out: Path) -> np.ndarray:
    """A drifting series of the real image (enlarged by cubic interpolation for sizes over
    1024) saved as TIFF."""
    code = textwrap.dedent(f"""
        import numpy as np, tifffile
        from scherzer import io as sio
        from scherzer.simulators.microscope import drifting_series_from_image
        from scipy import ndimage
        img = sio.import_stack({str(TESTDATA)!r}).frames[0].astype(float)
        zoom = ({size} + 64) / img.shape[0]
        if zoom > 1:  # enlarged, not tiled: a tiled field repeats and fools phase correlation
            img = ndimage.zoom(img, zoom, order=3)
        frames, truth = drifting_series_from_image(img, n_frames={n}, size_px={size},
                                                   dose_e_per_px=10.0, seed={seed})
        tifffile.imwrite({str(out)!r}, frames)
        np.save({str(out.with_suffix(".npy"))!r}, truth)
    """)
    subprocess.run([PY, "-c", code], check=True)
    return np.load(out.with_suffix(".npy"))


SKIMAGE_SCRIPT = textwrap.dedent("""
    import sys, json, time, numpy as np, tifffile
    from skimage.registration import phase_cross_correlation
    t0 = time.perf_counter()
    f = tifffile.imread(sys.argv[1]).astype(np.float32)
    s = [phase_cross_correlation(f[0], fr, upsample_factor=100)[0] for fr in f]
    print(json.dumps({"shifts_px": (-np.asarray(s)).tolist(), "seconds": time.perf_counter() - t0}))
""")

OURS_SCRIPT = textwrap.dedent("""
    import sys, json, time, numpy as np, tifffile
    from scherzer.processing.registration import AlignParams, measure_shifts
    f = tifffile.imread(sys.argv[1]).astype(np.float32)
    t0 = time.perf_counter()
    r = measure_shifts(f, AlignParams())
    print(json.dumps({"shifts_px": r.shifts_px.tolist(), "seconds": time.perf_counter() - t0}))
""")


def _rms(shifts: list, truth: np.ndarray) -> float:
    s = np.asarray(shifts, float)
    err = (s - s.mean(0)) - (truth - truth.mean(0))
    return float(np.sqrt(np.mean(np.sum(err**2, axis=1))))


def cold_align(tmp: Path) -> dict:
    tif = tmp / "s16_512.tif"
    truth = _series(16, 512, 1, tif)
    _measured([*SCHERZER, "align", str(tif), "--out", str(tmp / "warm.hspy")])  # numba cache
    ours = _measured([*SCHERZER, "align", str(tif), "--out", str(tmp / "o.hspy"), "--json"])
    got = json.loads(ours.pop("stdout"))
    peer = _measured([PY, "-c", SKIMAGE_SCRIPT, str(tif)])
    peer_out = json.loads(peer.pop("stdout"))
    return {
        "scherzer_align": {
            **ours,
            "seconds": got["seconds"],
            "rms_px": _rms(got["shifts_px"], truth),
        },
        "skimage_script": {**peer, "rms_px": _rms(peer_out["shifts_px"], truth)},
        "wall_ratio": round(ours["wall_s"] / peer["wall_s"], 2),
    }


def big_align(tmp: Path, sizes: list[int]) -> dict:
    out = {}
    for size in sizes:
        tif = tmp / f"s16_{size}.tif"
        truth = _series(16, size, 2, tif)
        frames_mb = 16 * size * size * 4 / 2**20
        row = {}
        for name, script in (("scherzer", OURS_SCRIPT), ("skimage", SKIMAGE_SCRIPT)):
            m = _measured([PY, "-c", script, str(tif)])
            got = json.loads(m.pop("stdout"))
            row[name] = {**m, "seconds": round(got["seconds"], 3),
                         "rms_px": round(_rms(got["shifts_px"], truth), 4),
                         "peak_over_frames": round(m["peak_mb"] / frames_mb, 2)}  # fmt: skip
        row["time_ratio"] = round(row["scherzer"]["seconds"] / row["skimage"]["seconds"], 2)
        out[f"16x{size}"] = row
    return out


def focal(tmp: Path) -> dict:
    out = {}
    for n, size in ((11, 512), (11, 1024), (20, 512)):
        path = tmp / f"focal_{n}_{size}.hspy"
        subprocess.run([*SCHERZER, "simulate", "focal-series", "--n", str(n), "--size", str(size),
                        "--out", str(path)], check=True, capture_output=True)  # fmt: skip
        m = _measured([*SCHERZER, "restore", str(path), "--out", str(tmp / "ew.hspy"), "--json"])
        got = json.loads(m.pop("stdout"))
        out[f"{n}x{size}"] = {**m, "seconds": round(got["seconds"], 3)}
    out["ratio_1024_over_512"] = round(out["11x1024"]["seconds"] / out["11x512"]["seconds"], 2)
    return out


def main() -> None:
    huge = "--huge" in sys.argv
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {
            "cold_align": cold_align(tmp),
            "big_align": big_align(tmp, [1024, 2048, *([4096] if huge else [])]),
            "focal": focal(tmp),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
