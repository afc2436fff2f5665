"""Focal-series registration + exit-wave restoration: speed and accuracy (prints JSON).

Default case: 11 images of 512² (0.02 nm pixels, 300 kV, Cs 0.6 mm), weak-phase amorphous
object, drift 0.7/−0.4 px per frame + 0.3 px jitter, a real step 3 % off the nominal one,
A1 = 2 nm at 30°, Poisson noise at 500 e/Å² — from tests/test_restoration.synthetic_series
(a known periodic exit wave through scherzer.optics.image_intensity). Optionally (--simulator)
the project's simulator (multislice crystal edge under a-C, camera with MTF/offset; the
camera's MTF and NPS are given to registration and restoration).

Baseline: a plain Gerchberg–Saxton-type focal-series reconstruction (the method of the open
PEWR code), written here: start from √I of the reference, then for every image propagate the
current wave to its defocus, impose the measured modulus √I_n keeping the phase, propagate back,
and average. It is given the true defocus and drift (registration is not part of it).

With --crystal NAME (srtio3_001, si_110; --thickness-nm) a crystal-only simulator field is
registered in crystal mode (FocalParams(crystal=True)).

Times: ``seconds`` are wall (perf_counter, the minimum of ``--repeat``), ``process_seconds``
the median process time (all threads; steadier on a shared machine); the registration's stages
(spectra, reference choice, first pass, wave passes with the absolute fits, the model check with
the thick-crystal fallback, finish) as [wall, process] seconds of the last repeat.

Usage: .venv/bin/python benchmarks/focal.py [--size 512] [--n 11] [--dose 500] [--gs-iter 30]
       [--simulator | --crystal srtio3_001 --thickness-nm 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_focal import simulator_crystal_edge, simulator_crystal_series
from test_restoration import band_limited_phase_error, fourier_shift, synthetic_series

from scherzer.optics import FrequencyGrid, fft_workers, wave_transfer
from scherzer.processing.focal import FocalParams, register_focal_series, restore_stack
from scherzer.processing.restoration import aligned_frames, restore_exit_wave


def gerchberg_saxton(frames, optics, pixel_nm, defocus_nm, shifts_px, iterations):
    """Plain GS focal-series reconstruction (complex64 wave); coherent propagators exp(−iχ)."""
    imgs = aligned_frames(frames, shifts_px)
    amp = np.sqrt(np.clip(imgs, 0, None)).astype(np.complex64)
    grid = FrequencyGrid(frames.shape[-2:], (pixel_nm, pixel_nm))
    prop = wave_transfer(optics, grid, np.asarray(defocus_nm, np.float64), envelopes=False)
    w = fft_workers()
    ref = int(np.argmin(np.abs(defocus_nm - optics.scherzer_defocus_nm())))
    psi = sfft.fft2(amp[ref], workers=w) * np.conj(prop[ref])
    for _ in range(iterations):
        waves = sfft.ifft2(psi[None] * prop, workers=w)
        waves = amp * np.exp(1j * np.angle(waves)).astype(np.complex64)
        psi = np.mean(sfft.fft2(waves, workers=w) * np.conj(prop), axis=0)
    return sfft.ifft2(psi, workers=w).astype(np.complex64)


def series(args):
    """The benchmark series (module docstring): the test suite's own builders."""
    if args.crystal:
        return simulator_crystal_series(
            args.crystal, args.thickness_nm, args.size, n=args.n, dose_e_per_A2=args.dose
        )
    if args.simulator:
        return simulator_crystal_edge(args.size, args.dose, n=args.n)[0]
    return synthetic_series(
        "weak_phase",
        n=args.n,
        size=args.size,
        start_nm=-100.0,
        step_nm=10.0,
        step_error_fraction=0.03,
        dose_e_per_A2=args.dose,
        a1_nm=2.0,
        a1_deg=30.0,
        seed=1,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=11)
    ap.add_argument("--dose", type=float, default=500.0)
    ap.add_argument("--gs-iter", type=int, default=30)
    ap.add_argument("--nl-iter", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--simulator", action="store_true")
    ap.add_argument(
        "--crystal", default="", help="crystal-only simulator field: srtio3_001, si_110"
    )
    ap.add_argument("--thickness-nm", type=float, default=1.0)
    args = ap.parse_args()
    params = FocalParams(crystal=bool(args.crystal))

    st = series(args)
    gt = st.ground_truth
    optics, pix = st.optics, st.pixel_size_nm[0]
    frames = st.frames
    mtf = nps = None
    if "camera" in st.instrument:
        from scherzer.simulators.detector import CameraModel

        cam = CameraModel(**st.instrument["camera"])
        frames = frames - np.float32(cam.offset_counts)
        mtf, nps = cam.mtf_2d(frames.shape[-2:]), cam.ntf_2d(frames.shape[-2:]) ** 2

    register_focal_series(st, optics, params)  # warm-up (imports, FFT plans, numba cache)
    t_reg, cpu_reg = [], []
    for _ in range(args.repeat):
        c0 = time.process_time()
        reg = register_focal_series(st, optics, params, mtf=mtf, nps=nps)
        cpu_reg.append(time.process_time() - c0)
        t_reg.append(reg.seconds)
    r = reg.reference_index
    rel_true = gt["defocus_nm"] - gt["defocus_nm"][r]
    sh_true = gt["shifts_px"] - gt["shifts_px"][r]

    def restore(iterations):  # the pipeline's restore step; noise measured per image
        times, cpu, res = [], [], None
        for _ in range(args.repeat):
            c0 = time.process_time()
            res = restore_stack(
                st, reg, optics, mtf=mtf, nps=nps, iterations=iterations, use_dose_weights=False
            )
            cpu.append(time.process_time() - c0)
            times.append(res.seconds)
        return res, min(times), float(np.median(cpu))

    lin, t_lin, cpu_lin = restore(0)
    nl, t_nl, cpu_nl = restore(args.nl_iter)
    # the restored wave sits in the reference frame: move the truth there
    truth = np.asarray(gt["exit_wave"])
    s_ref = np.asarray(gt["shifts_px"][r])[None]
    truth_ref = (
        fourier_shift(truth.real[None], s_ref)[0] + 1j * fourier_shift(truth.imag[None], s_ref)[0]
    )

    def phase_err(wave):
        return band_limited_phase_error(wave, truth_ref, optics, pix)

    # baseline: GS with the TRUE defocus (incl. A1) and drift
    t0 = time.perf_counter()
    gs = gerchberg_saxton(
        frames,
        optics.with_(a1_nm=gt["a1_nm"], a1_deg=gt["a1_deg"]),
        pix,
        gt["defocus_nm"],
        sh_true,
        args.gs_iter,
    )
    t_gs = time.perf_counter() - t0
    # ours with the true parameters too, for a like-for-like restoration comparison
    ours_true = restore_exit_wave(
        frames,
        optics,
        pix,
        gt["defocus_nm"],
        sh_true,
        astigmatism=(gt["a1_nm"], gt["a1_deg"]),
        mtf=mtf,
        nps=nps,
    )

    out = {
        "case": {
            "source": (
                f"simulator {args.crystal} {args.thickness_nm} nm, crystal mode"
                if args.crystal
                else "simulator crystal_edge"
                if args.simulator
                else "synthetic weak_phase"
            ),
            "n_images": args.n,
            "size": args.size,
            "dose_e_per_A2": args.dose,
            "cpu_count": os.cpu_count(),
            "fft_workers": fft_workers(),
        },
        "registration": {
            "seconds_min": min(t_reg),
            "seconds_all": t_reg,
            "process_seconds_median": float(np.median(cpu_reg)),
            "passes": reg.passes,
            "relative_defocus_rms_nm": float(
                np.sqrt(np.mean((reg.relative_defocus_nm - rel_true) ** 2))
            ),
            "drift_rms_px": float(np.sqrt(np.mean((reg.shifts_px - sh_true) ** 2))),
            "absolute_defocus_max_err_nm": float(np.max(np.abs(reg.defocus_nm - gt["defocus_nm"]))),
            "a1_nm": reg.astigmatism_nm,
            "a1_deg": reg.astigmatism_deg,
            "a1_true": [gt["a1_nm"], gt["a1_deg"]],
            "flagged": np.flatnonzero(reg.flagged).tolist(),
            "model_fit": {k: reg.model_fit[k] for k in ("fits", "series_spot_ratio")}
            | {"fallback": reg.model_fit.get("fallback")},
            "stage_wall_and_process_seconds": next(
                (h["stage_seconds"] for h in reg.history if "stage_seconds" in h), None
            ),
        },
        "restoration_wiener": {
            "seconds": t_lin,
            "process_seconds_median": cpu_lin,
            "phase_rms_err_rad": phase_err(lin.wave),
        },
        f"restoration_wiener_plus_{args.nl_iter}_nonlinear": {
            "seconds": t_nl,
            "process_seconds_median": cpu_nl,
            "process_seconds_per_iteration": (cpu_nl - cpu_lin) / max(args.nl_iter, 1),
            "phase_rms_err_rad": phase_err(nl.wave),
            "image_residual_per_iteration": nl.residual_history,
        },
        "registration_plus_restoration_seconds": min(t_reg) + t_lin,
        "with_true_parameters": {
            "ours_wiener": {
                "seconds": ours_true.seconds,
                "phase_rms_err_rad": phase_err(ours_true.wave),
            },
            f"baseline_gerchberg_saxton_{args.gs_iter}_iter": {
                "seconds": t_gs,
                "phase_rms_err_rad": phase_err(gs),
            },
        },
        "note": "phase error: RMS within the information limit after removing the global phase",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
