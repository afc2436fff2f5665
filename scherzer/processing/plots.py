"""Every PNG the processing engines make, and the one helper that writes them.

One job: turn results into figures. Engines return numbers; callers (the pipeline, the CLI,
the demo) ask for plots here. Figures are made with matplotlib's non-interactive Agg backend
(no display needed) and always closed after saving (:func:`save_figure`), so long-running
daemons do not accumulate open figures.

Conventions: image index on the x axis; defocus in nm (C1 < 0 underfocus), drift in px
(``shifts_px[i] = (dy, dx)``, ARCHITECTURE.md) with a second axis in nm when the pixel size is
known, phase in rad. Images carry a scale bar in nm (matplotlib-scalebar) when the pixel size is
known, a colour bar saying what the grey levels are, and the signal's name in the title.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from scherzer.processing.focal import FocalRegistration
    from scherzer.processing.registration import AlignmentResult

__all__ = [
    "plot_alignment",
    "plot_registration",
    "plot_wave",
    "pyplot",
    "save_figure",
    "show_image",
]

PNG_DPI = 100  # resolution of every saved PNG: legible labels at a few tens of kB per plot
SUSPECT_PEAK = 0.01  # the focal peak-height plot's marked level (peaks below it are suspect)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = PNG_DPI, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (PNG; parent folders created) and close it. ``tight``: trim
    the figure to its content (bbox_inches="tight") after laying it out. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        pyplot().close(fig)
    return path


def show_image(
    fig: Any, ax: Any, image: np.ndarray, title: str, unit_label: str, pixel_nm: float | None
) -> None:
    """``image`` in grey with a colour bar labelled ``unit_label`` (what the grey levels mean),
    a scale bar in nm when ``pixel_nm`` is known (else pixel axes), and ``title``."""
    im = ax.imshow(image, cmap="gray")
    fig.colorbar(im, ax=ax, fraction=0.046, label=unit_label)
    ax.set_title(title)
    if pixel_nm is None:
        ax.set(xlabel="x (px)", ylabel="y (px)")
        return
    from matplotlib_scalebar.scalebar import ScaleBar

    ax.add_artist(ScaleBar(pixel_nm, "nm", location="lower right", box_alpha=0.6))
    ax.set_axis_off()


def plot_wave(
    wave: np.ndarray, out_dir: str | Path, name: str = "exit_wave", pixel_nm: float | None = None
) -> list[Path]:
    """Phase and amplitude of ``wave`` as PNGs in ``out_dir`` (created), and its real and
    imaginary parts side by side; returns the paths."""
    plt = pyplot()
    out = Path(out_dir)
    paths = []
    for label, img, unit in (("phase", np.angle(wave), "phase (rad)"),
                             ("amplitude", np.abs(wave), "amplitude (vacuum = 1)")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(5.5, 5))
        show_image(fig, ax, img, f"{name}: {label}", unit, pixel_nm)
        paths.append(save_figure(fig, out / f"{name}_{label}.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, label, img in zip(axes, ("real part", "imaginary part"), (wave.real, wave.imag),
                              strict=True):  # fmt: skip
        show_image(fig, ax, img, f"{name}: {label}", label, pixel_nm)
    paths.append(save_figure(fig, out / f"{name}_real_imag.png"))
    return paths


def _drift_in_nm(ax: Any, pixel_nm: float | None) -> None:
    """A right-hand axis in nm beside a drift axis in px."""
    if pixel_nm is not None:
        ax.secondary_yaxis(
            "right", functions=(lambda v: v * pixel_nm, lambda v: v / pixel_nm)
        ).set_ylabel("drift (nm)")


def plot_registration(
    result: FocalRegistration, out_dir: str | Path, pixel_nm: float | None = None
) -> list[Path]:
    """PNGs in ``out_dir`` of a focal-series registration (the three plots users read): fitted
    focus vs index with a line fit and its residuals, peak heights (suspect ones red), drift
    y/x vs index (px, and nm when ``pixel_nm`` is given). Returns the paths."""
    plt = pyplot()
    out = Path(out_dir)
    idx = np.arange(len(result.defocus_nm))
    u = result.used

    fig, (ax, axr) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(idx, result.nominal_defocus_nm, "x", color="0.6", label="nominal")
    ax.plot(idx[u], result.defocus_nm[u], "o", label="fitted")
    ax.plot(idx[~u], result.defocus_nm[~u], "o", mfc="none", color="r", label="not used")
    if u.sum() >= 2:
        k, c = np.polyfit(idx[u], result.defocus_nm[u], 1)
        ax.plot(idx, k * idx + c, "-", lw=1, label=f"line: step {k:.2f} nm")
        axr.plot(idx, result.defocus_nm - (k * idx + c), "o-")
    ax.set_ylabel("defocus C1 (nm)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Fitted focus against image index")
    axr.axhline(0, color="0.5", lw=0.5)
    axr.set_ylabel("residual (nm)")
    axr.set_xlabel("image index")
    paths = [save_figure(fig, out / "focus_vs_index.png", tight=False)]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(idx, result.peak_heights, color=np.where(result.flagged, "r", "C0"))
    ax.axhline(SUSPECT_PEAK, color="r", ls="--", lw=0.8, label=f"{SUSPECT_PEAK} (suspect below)")
    ax.set_xlabel("image index")
    ax.set_ylabel("correlation peak")
    ax.set_title("Peak heights (red: flagged, not used)")
    ax.legend(fontsize=8, loc="best")
    paths.append(save_figure(fig, out / "peak_heights.png", tight=False))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(idx, result.shifts_px[:, 1], "o-", label="x")
    ax.plot(idx, result.shifts_px[:, 0], "s-", label="y")
    ax.set_xlabel("image index")
    ax.set_ylabel("drift (px)")
    ax.set_title("Drift relative to the reference image")
    _drift_in_nm(ax, pixel_nm)
    ax.legend(fontsize=8, loc="best")
    paths.append(save_figure(fig, out / "drift.png", tight=False))
    return paths


def plot_alignment(
    result: AlignmentResult,
    average: np.ndarray,
    out_dir: str | Path,
    pixel_nm: float | None = None,
    signal: str = "",
) -> list[Path]:
    """PNGs in ``out_dir`` of a rigid alignment of ``signal``: shifts against frame (flagged
    frames red; px, and nm when ``pixel_nm`` is given), the similarity matrix, the average.
    Returns the paths."""
    name = f"{signal}: " if signal else ""
    plt = pyplot()
    out = Path(out_dir)
    paths = []
    idx = np.arange(len(result.shifts_px))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(idx, result.shifts_px[:, 0], "o-", label="dy")
    ax.plot(idx, result.shifts_px[:, 1], "s-", label="dx")
    for f in result.flagged:
        ax.axvline(f, color="red", alpha=0.3)
    ax.set(xlabel="frame", ylabel="shift (px)", title=f"{name}measured drift (red: flagged)")
    _drift_in_nm(ax, pixel_nm)
    ax.legend(loc="best")
    paths.append(save_figure(fig, out / "shifts.png", tight=False))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(result.similarity, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, label="normalised peak height")
    ax.set(xlabel="frame", ylabel="frame", title=f"{name}similarity between frames")
    paths.append(save_figure(fig, out / "similarity.png", tight=False))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    show_image(fig, ax, average, f"{name}aligned average", "mean intensity (counts)", pixel_nm)
    paths.append(save_figure(fig, out / "average.png", tight=False))
    return paths
