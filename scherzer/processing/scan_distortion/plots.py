"""PNGs of a scan-distortion correction: displacement fields per frame, affine parameters
against frame, convergence against cycle, the average before/after with its FFT.

Figures go through :func:`scherzer.processing.plots.save_figure` (Agg, closed after saving).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scherzer.processing.plots import pyplot, save_figure
from scherzer.processing.scan_distortion.result import NonrigidResult

__all__ = ["plot_nonrigid"]

MAX_FIELD_FRAMES = 8  # field maps drawn (the first frames): legibility against file size
AFFINE_LABELS = ("dy₀", "∂dy/∂r", "∂dy/∂c", "dx₀", "∂dx/∂r", "∂dx/∂c")


def _log_fft(image: np.ndarray) -> np.ndarray:
    img = np.where(np.isfinite(image), image, np.nanmean(image))
    img = (img - img.mean()) * np.outer(np.hanning(img.shape[0]), np.hanning(img.shape[1]))
    return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(img))))


def plot_nonrigid(
    result: NonrigidResult, out_dir: str | Path, before: np.ndarray | None = None
) -> list[Path]:
    """Write the plots to ``out_dir``; ``before``: the rigid (or raw) average to compare
    with. Returns the paths."""
    plt = pyplot()
    out = Path(out_dir)
    paths = []
    n = min(len(result.affine), MAX_FIELD_FRAMES)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.4), squeeze=False)
    fields = [result.field(i) for i in range(n)]  # expanded once, only the frames shown
    lim = float(max(np.nanmax(np.abs(f)) for f in fields)) or 1.0
    for i in range(n):
        for a, label in enumerate(("dy", "dx")):
            ax = axes[a, i]
            im = ax.imshow(fields[i][a], cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"frame {i} {label}" + (" (flagged)" if i in result.flagged else ""),
                         fontsize=8)  # fmt: skip
            ax.set_axis_off()
    fig.colorbar(im, cax=axes[0, -1].inset_axes([1.05, -1.1, 0.06, 2.1]), label="px")
    paths.append(save_figure(fig, out / "fields.png", tight=False))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    idx = np.arange(len(result.affine))
    for k in (0, 3):
        axes[0].plot(idx, result.affine[:, k], "o-", label=AFFINE_LABELS[k])
    for k in (1, 2, 4, 5):
        axes[1].plot(idx, result.affine[:, k], "o-", label=AFFINE_LABELS[k])
    axes[0].set(xlabel="frame", ylabel="px", title="Offset (scan coordinates)")
    axes[1].set(xlabel="frame", ylabel="per px", title="Shear and stretch")
    for ax in axes:
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "affine.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    updates = [max(h["mean_update_px"], 1e-9) for h in result.history]
    ax.semilogy(np.arange(len(updates)), updates, "o-")
    ax.axhline(result.params.convergence_px, color="grey", ls=":", label="target")
    ax.set(xlabel="cycle (affine, then non-linear)", ylabel="mean |update| (px)",
           title="Convergence")  # fmt: skip
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "convergence.png"))
    images = [("after", result.average)] + ([("before", before)] if before is not None else [])
    fig, axes = plt.subplots(2, len(images), figsize=(4.5 * len(images), 9), squeeze=False)
    for j, (label, img) in enumerate(images):
        axes[0, j].imshow(img, cmap="gray")
        axes[0, j].set_title(f"average {label}")
        axes[1, j].imshow(_log_fft(img), cmap="magma")
        axes[1, j].set_title(f"|FFT| {label} (log)")
        for a in axes[:, j]:
            a.set_axis_off()
    paths.append(save_figure(fig, out / "average.png"))
    return paths
