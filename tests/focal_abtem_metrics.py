"""The abTEM focal series as an ImageStack and its ground-truth metrics (tests/test_focal_abtem.py
and benchmarks/crosscheck_abtem.py share them; the series are made by
``benchmarks/crosscheck_abtem.py --focal-series CASE``, abTEM 1.0.11, seed 0).

Conventions: the restored wave sits in the reference image's frame (ARCHITECTURE.md shifts:
frame_i(r) ≈ ref(r − s_i)), so the true exit wave (recorded at zero shift) is moved by the
reference's true shift before comparing; the comparison leaves out a border of
``PHASE_BORDER_PX`` (wrap of that shift, the restoration's edge taper).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PHASE_LOWPASS_PER_NM = 8.0  # issue #15: both waves low-passed to 8 nm⁻¹ before comparing
PHASE_BORDER_PX = 32  # border left out of the phase correlation (≥ the drift, the taper)
#: 11 × 256² SrTiO3 [001] edge, 8 cells (3.1 nm) under 2 nm a-C, 150 e/Å², −150 nm + 10 nm
#: steps (true step 3 % larger), A1 4 nm at 30°, drift 0.7/−0.4 px per frame + 0.3 px jitter
TESTDATA = Path(__file__).resolve().parent / "data" / "abtem_srtio3_edge_8cells_11x256.npz"


def load_series(path=TESTDATA):
    """The .npz of ``crosscheck_abtem.py --focal-series`` as an ImageStack (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return focal_stack({k: data[k] for k in data.files})


def focal_stack(data):
    """An ImageStack (counts as float32, nominal defocus and dose per frame, the instrument
    without A1, the truth as ground_truth) from :func:`abtem_focal_series`'s arrays (or a
    loaded .npz of them)."""
    from scherzer.stack import FrameRecord, ImageStack

    n = data["frames"].shape[0]
    dose = float(data["dose_e_per_A2"])
    records = [
        FrameRecord(index=i, time_s=2.0 * i, exposure_s=1.0, dose_e_per_A2=dose, signal="HRTEM",
                    defocus_nominal_nm=float(data["nominal_defocus_nm"][i]))
        for i in range(n)
    ]  # fmt: skip
    pix = float(data["pixel_nm"])
    return ImageStack(
        frames=np.asarray(data["frames"], np.float32),
        pixel_size_nm=(pix, pix),
        records=records,
        instrument={"optics": json.loads(str(data["optics_json"]))},
        metadata={"source": "abTEM focal series", **json.loads(str(data["case_json"]))},
        ground_truth={
            "defocus_nm": np.asarray(data["true_defocus_nm"], np.float64),
            "shifts_px": np.asarray(data["true_shifts_px"], np.float64),
            "exit_wave": np.asarray(data["exit_wave"]),
            "a1_nm": float(data["true_a1"][0]),
            "a1_deg": float(data["true_a1"][1]),
        },
    )


def shift_wave(wave: np.ndarray, shift_px) -> np.ndarray:
    """The periodic wave with its content moved by +shift_px (dy, dx)."""
    ky = np.fft.fftfreq(wave.shape[0])[:, None]
    kx = np.fft.fftfreq(wave.shape[1])[None, :]
    ramp = np.exp(-2j * np.pi * (ky * shift_px[0] + kx * shift_px[1]))
    return np.fft.ifft2(np.fft.fft2(wave) * ramp)


def lowpass(wave: np.ndarray, pixel_nm: float, k_max_per_nm: float) -> np.ndarray:
    k2 = (
        np.fft.fftfreq(wave.shape[0], pixel_nm)[:, None] ** 2
        + np.fft.fftfreq(wave.shape[1], pixel_nm)[None, :] ** 2
    )
    return np.fft.ifft2(np.fft.fft2(wave) * (k2 <= k_max_per_nm**2))


def phase_correlation(
    wave: np.ndarray,
    stack,
    reference: int,
    k_max_per_nm: float = PHASE_LOWPASS_PER_NM,
    border_px: int = PHASE_BORDER_PX,
) -> float:
    """Pearson correlation of the phases of the restored and the true exit wave, both
    low-passed to ``k_max_per_nm``, inside the border (module doc)."""
    gt = stack.ground_truth
    pix = float(stack.pixel_size_nm[1])
    truth = shift_wave(np.asarray(gt["exit_wave"]), np.asarray(gt["shifts_px"])[reference])
    a = lowpass(np.asarray(wave, np.complex128), pix, k_max_per_nm)
    b = lowpass(truth, pix, k_max_per_nm)
    a = a * np.exp(-1j * np.angle(np.vdot(b, a)))  # the global phase is free
    inner = (slice(border_px, -border_px),) * 2
    pa, pb = np.angle(a)[inner].ravel(), np.angle(b)[inner].ravel()
    return float(np.corrcoef(pa, pb)[0, 1])


def registration_errors(reg, stack) -> dict:
    """Relative defocus RMS (about the chosen reference), absolute RMS and max, drift RMS."""
    gt = stack.ground_truth
    r = reg.reference_index
    rel_true = gt["defocus_nm"] - gt["defocus_nm"][r]
    d_abs = reg.defocus_nm - gt["defocus_nm"]
    return {
        "reference": int(r),
        "relative_rms_nm": float(np.sqrt(np.mean((reg.relative_defocus_nm - rel_true) ** 2))),
        "absolute_rms_nm": float(np.sqrt(np.mean(d_abs**2))),
        "absolute_max_nm": float(np.max(np.abs(d_abs))),
        "absolute_mean_nm": float(np.mean(d_abs)),
        "drift_rms_px": float(
            np.sqrt(np.mean((reg.shifts_px - (gt["shifts_px"] - gt["shifts_px"][r])) ** 2))
        ),
        "a1": [float(reg.astigmatism_nm), float(reg.astigmatism_deg)],
        "a1_true": [float(gt["a1_nm"]), float(gt["a1_deg"])],
        "per_image_absolute_error_nm": [round(float(v), 3) for v in d_abs],
    }


MIN_PHASE_TRANSFER = 0.1  # a frequency no image transfers with |sin χ| ≥ this carries no
# restorable phase (its phase contrast is < a tenth of the weak-phase maximum in every image)


def transferred_band_lowpass(
    wave: np.ndarray, stack, k_max_per_nm: float = PHASE_LOWPASS_PER_NM
) -> np.ndarray:
    """The wave restricted to the frequencies below ``k_max_per_nm`` that some image of the
    series transfers as phase contrast (max_n |sin χ_n(k)| ≥ ``MIN_PHASE_TRANSFER``, χ at the
    true defocus without astigmatism), plus g = 0."""
    from scherzer.optics import FrequencyGrid, chi

    gt = stack.ground_truth
    pix = float(stack.pixel_size_nm[1])
    grid = FrequencyGrid(wave.shape, (pix, pix), rfft=False)
    opt = stack.optics
    best = np.zeros(wave.shape)
    for d in gt["defocus_nm"]:
        best = np.maximum(best, np.abs(np.sin(chi(opt, grid, float(d)))))
    k2 = (
        np.fft.fftfreq(wave.shape[0], pix)[:, None] ** 2
        + np.fft.fftfreq(wave.shape[1], pix)[None, :] ** 2
    )
    keep = (best >= MIN_PHASE_TRANSFER) & (k2 <= k_max_per_nm**2)
    keep[0, 0] = True
    return np.fft.ifft2(np.fft.fft2(wave) * keep)


def transferred_phase_correlation(
    wave: np.ndarray, stack, reference: int, border_px: int = PHASE_BORDER_PX
) -> float:
    """:func:`phase_correlation` on the frequencies the series transfers
    (:func:`transferred_band_lowpass`): what a restoration can recover at all."""
    gt = stack.ground_truth
    truth = shift_wave(np.asarray(gt["exit_wave"]), np.asarray(gt["shifts_px"])[reference])
    a = transferred_band_lowpass(np.asarray(wave, np.complex128), stack)
    b = transferred_band_lowpass(truth, stack)
    a = a * np.exp(-1j * np.angle(np.vdot(b, a)))
    inner = (slice(border_px, -border_px),) * 2
    return float(np.corrcoef(np.angle(a)[inner].ravel(), np.angle(b)[inner].ravel())[0, 1])
