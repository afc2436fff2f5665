"""The shared band/transfer kernel of focal-series registration and exit-wave restoration.

One job: represent the information-carrying frequencies of a series as a flat band, evaluate
the wave transfer on it, prepare frame spectra, read camera curves, and solve the per-frequency
information band; the 2×2 Wiener solve on it is :mod:`scherzer.processing.wiener`. Shared by
:mod:`scherzer.processing.focal` and :mod:`scherzer.processing.restoration`.

Units and conventions
---------------------
* Numerics in Å and 1/Å (via :mod:`scherzer.optics`); band frequencies are also kept in
  cycles per pixel (``gy``, ``gx``) for shifts. Boundary names carry nm / px.
* Images are normalised to mean 1 (vacuum intensity). Spectra are unnormalised forward FFTs
  (``scipy.fft.fft2``), ``fftfreq`` order.
* Linear imaging model (the full two-sided form): with ψ = 1 + φ and the wave transfer
  T_n(g) = A(g) E_t(g) E_s,n(g) exp(−iχ_n(g)) of :func:`scherzer.optics.wave_transfer`,

      I_n(g) = C(g) [ φ(g) T_n(g) + φ*(−g) T_n*(−g) ] + noise,

  C(g) being the camera MTF times the vibration envelope. For every frequency the pair
  (φ(g), φ*(−g)) is solved jointly from all images: a 2×2 weighted least-squares (Wiener) system
  per frequency, with noise weights 1/(σ_n² NPS(g)) and a Wiener prior 1/S(g) whose radial power
  S is estimated from the data.
* Shifts follow ARCHITECTURE.md: frame_n(r) ≈ ref(r − s_n), so the aligned spectrum is
  I_n(g) exp(+2πi g·s_n) with g in cycles/px.
* Camera curves (MTF, NPS) are functions of q = |g|/Nyquist (see :func:`camera_curve_to_grid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    aperture,
    chi,
    chi_gradient_sq,
    fft_workers,
    spatial_envelope_of_gradient,
    temporal_envelope,
)

__all__ = [
    "BandTransfer",
    "CameraCurve",
    "SpectralBand",
    "camera_curve_to_grid",
    "crop_area",
    "edge_taper",
    "frame_spectra",
    "information_band",
    "load_camera_curve",
    "normalise_frames",
    "parametric_mtf",
    "profile_to_nyquist",
    "shift_phase",
]

CameraCurve = np.ndarray | Callable[[np.ndarray], np.ndarray] | None


# --------------------------------------------------------------------------------------------
# spectral band: the frequencies that carry information, as flat vectors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SpectralBand:
    """A set of FFT frequencies closed under g → −g, stored as flat index vectors.

    ``idx``: flat indices into the (ny, nx) grid; ``neg``: for each band element the position of
    −g within the band; ``gy``, ``gx``: frequencies in cycles/px (float64).
    """

    shape: tuple[int, int]
    idx: np.ndarray
    neg: np.ndarray
    gy: np.ndarray
    gx: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> SpectralBand:
        ny, nx = mask.shape
        negy = (-np.arange(ny)) % ny
        negx = (-np.arange(nx)) % nx
        sym = mask & mask[negy][:, negx]
        idx = np.flatnonzero(sym)
        pos = np.full(ny * nx, -1, dtype=np.int64)
        pos[idx] = np.arange(idx.size)
        iy, ix = np.divmod(idx, nx)
        neg = pos[negy[iy] * nx + negx[ix]]
        gy = np.fft.fftfreq(ny)[iy]
        gx = np.fft.fftfreq(nx)[ix]
        return cls((ny, nx), idx, neg, gy, gx)

    @property
    def size(self) -> int:
        return int(self.idx.size)

    def gather(self, full: np.ndarray) -> np.ndarray:
        """(…, ny, nx) → (…, m)."""
        return full.reshape(*full.shape[:-2], -1)[..., self.idx]

    def scatter(self, vec: np.ndarray) -> np.ndarray:
        """(…, m) → (…, ny, nx) with zeros outside the band."""
        out = np.zeros((*vec.shape[:-1], self.shape[0] * self.shape[1]), dtype=vec.dtype)
        out[..., self.idx] = vec
        return out.reshape(*vec.shape[:-1], *self.shape)

    @cached_property
    def product_box(self) -> tuple[tuple[int, int], np.ndarray]:
        """A smaller FFT grid on which products of two band-limited fields are alias-free on
        the band: each side ≥ 3 × the band's half-width (+2); and the band's flat indices in it.
        """
        ny, nx = self.shape
        iy = np.rint(self.gy * ny).astype(np.int64)
        ix = np.rint(self.gx * nx).astype(np.int64)
        by = min(ny, sfft.next_fast_len(int(3 * np.abs(iy).max() + 2)))
        bx = min(nx, sfft.next_fast_len(int(3 * np.abs(ix).max() + 2)))
        return (by, bx), (iy % by) * bx + (ix % bx)

    @cached_property
    def _memo(self) -> dict[Any, Any]:
        return {}

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per band and ``key`` (fixed per-band tables)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def radial_bins(self, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
        """(radial bin (m,) of every element: |g| over its maximum in ``n_bins`` equal bins,
        elements per bin ≥ 1), computed once per band and bin count."""

        def make() -> tuple[np.ndarray, np.ndarray]:
            q = np.hypot(self.gy, self.gx)
            which = np.minimum((q / (q.max() + 1e-12) * n_bins).astype(int), n_bins - 1)
            return which, np.maximum(np.bincount(which, None, n_bins), 1)

        return self.memo(("radial_bins", n_bins), make)

    @cached_property
    def neg32(self) -> np.ndarray:
        """``neg`` as int32 (kernels: half the index traffic)."""
        return self.neg.astype(np.int32)

    @cached_property
    def axis_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, column) index (m,) of every band element in the (ny, nx) grid."""
        return np.divmod(self.idx, self.shape[1])

    @cached_property
    def product_box_half(self) -> tuple[np.ndarray, np.ndarray]:
        """The band in the rfft2 half of :attr:`product_box`: flat indices into the
        (by, bx//2 + 1) grid and, per element, whether it is the conjugate of the element
        found there (its −g lies in the half)."""
        (by, bx), _ = self.product_box
        iy = np.rint(self.gy * self.shape[0]).astype(np.int64) % by
        ix = np.rint(self.gx * self.shape[1]).astype(np.int64) % bx
        conj = ix > bx // 2
        iy = np.where(conj, (-iy) % by, iy)
        ix = np.where(conj, (-ix) % bx, ix)
        return iy * (bx // 2 + 1) + ix, conj

    def conj_neg(self, vec: np.ndarray) -> np.ndarray:
        """v*(−g) for every band element (C-ordered: a fancy index on the last axis would
        return a transposed layout, slower to make and to read)."""
        out = np.take(vec, self.neg, axis=-1)
        return np.conjugate(out, out=out) if np.iscomplexobj(out) else out


def shift_phase(band: SpectralBand, shifts_px: np.ndarray) -> np.ndarray:
    """exp(+2πi g·s) (n, m) complex64: multiplying a frame spectrum by it applies −s.

    Separable: per-axis factors (n, ny) and (n, nx) (complex128, stored as complex64), their
    product gathered on the band (no complex exponential per band element)."""
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    iy, ix = band.axis_index
    ey = np.exp(2j * math.pi * s[:, :1] * np.fft.fftfreq(band.shape[0])[None])
    ex = np.exp(2j * math.pi * s[:, 1:] * np.fft.fftfreq(band.shape[1])[None])
    return ey.astype(np.complex64)[:, iy] * ex.astype(np.complex64)[:, ix]


class BandTransfer:
    """Wave transfer of one instrument evaluated on a spectral band, for any defocus.

    χ is linear in C1: χ(D) = χ₀ + D·u with χ₀ = :func:`chi` at zero defocus (all other
    aberrations of ``optics`` included) and u = ∂χ/∂C1 per nm. The spatial envelope is taken
    from :func:`spatial_envelope` at ``envelope_defocus_nm`` (it varies slowly with defocus).
    """

    def __init__(self, optics: Optics, grid: FrequencyGrid, band: SpectralBand):
        self.optics, self.grid, self.band = optics, grid, band
        self.chi0 = band.gather(chi(optics, grid, 0.0)).astype(np.float64)
        unit_optics = Optics(voltage_kv=optics.voltage_kv)
        self.unit = band.gather(chi(unit_optics, grid, 1.0)).astype(np.float64)
        self.env_t = band.gather(aperture(optics, grid) * temporal_envelope(optics, grid))

    def spatial(self, defocus_nm: np.ndarray) -> np.ndarray:
        """E_s on the band for each defocus, (n, m) float32.

        E_s = exp(−(α/2λ)² |∇χ|²) (:func:`spatial_envelope`); defocus enters the radial
        derivative of χ linearly, so |∇χ|² is a quadratic polynomial in C1 whose three
        coefficients are taken once from :func:`chi_gradient_sq` (no full-grid work per call).
        """
        d = np.atleast_1d(np.asarray(defocus_nm, dtype=np.float64))
        alpha = self.optics.beam_divergence_mrad * 1e-3
        if alpha == 0:
            return np.ones((d.size, self.band.size), np.float32)
        c0, c1, c2 = self._gradient_sq_poly  # pre-scaled by −(α/2λ)²
        x = d.astype(np.float32)[:, None]
        arg = c0[None] + x * (c1[None] + x * c2[None])
        return np.exp(np.minimum(arg, 0.0, out=arg), out=arg)

    @cached_property
    def _gradient_sq_poly(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(c0, c1, c2) float32 on the band with −(α/2λ)² |∇χ|²(C1 nm) = c0 + c1·C1 + c2·C1²."""
        h = self._POLY_STEP_NM
        g = [self.band.gather(chi_gradient_sq(self.optics, self.grid, v)).astype(np.float64)
             for v in (-h, 0.0, h)]  # fmt: skip
        scale = -((self.optics.beam_divergence_mrad * 1e-3 / (2.0 * self.optics.wavelength_A)) ** 2)
        coef = (g[1], (g[2] - g[0]) / (2.0 * h), (g[2] + g[0] - 2.0 * g[1]) / (2.0 * h * h))
        return tuple((scale * c).astype(np.float32) for c in coef)

    _POLY_STEP_NM = 100.0  # sample spacing of the quadratic (well conditioned for |C1| ~ 100)

    def chi(self, defocus_nm: np.ndarray) -> np.ndarray:
        d = np.atleast_1d(np.asarray(defocus_nm, dtype=np.float64))
        return self.chi0[None] + d[:, None] * self.unit[None]

    def amplitude(self, env_s: np.ndarray) -> np.ndarray:
        """|T| = A E_t E_s on the band (float32), for spatial envelopes ``env_s``."""
        return (self.env_t * env_s).astype(np.float32, copy=False)

    def transfer(
        self,
        defocus_nm: np.ndarray,
        env_s: np.ndarray | None = None,
        amp: np.ndarray | None = None,
    ) -> np.ndarray:
        """T(g) = A E_t E_s exp(−iχ) on the band, (n, m) complex64 (``amp``: |T| from
        :meth:`amplitude`, when the caller evaluates many defoci with one envelope)."""
        x = self.chi(defocus_nm).astype(np.float32)
        if amp is None:
            amp = self.amplitude(self.spatial(defocus_nm) if env_s is None else env_s)
        out = np.empty(x.shape, np.complex64)
        out.real = amp * np.cos(x)
        out.imag = -amp * np.sin(x)
        return out

    def pair(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) = (T(g), T*(−g)), the coefficients of φ(g) and φ*(−g)."""
        return t, self.band.conj_neg(t)


# --------------------------------------------------------------------------------------------
# camera response (MTF, NPS)
# --------------------------------------------------------------------------------------------
def parametric_mtf(q: np.ndarray, a: float = 0.7, c: float = 0.35) -> np.ndarray:
    """A parametric camera MTF of q = |g|/Nyquist: sinc(q/2)·[a/(1 + (q/c)²) + 1 − a].

    The sinc is the pixel aperture; the Lorentzian term models scintillator spread.
    """
    q = np.asarray(q, dtype=np.float64)
    return (np.sinc(q / 2.0) * (a / (1.0 + (q / c) ** 2) + 1.0 - a)).astype(np.float32)


def _nyquist_fraction(shape: tuple[int, int]) -> np.ndarray:
    gy = np.fft.fftfreq(shape[0])[:, None]
    gx = np.fft.fftfreq(shape[1])[None, :]
    return np.sqrt(gy**2 + gx**2) / 0.5


def camera_curve_to_grid(curve: CameraCurve, shape: tuple[int, int], name: str) -> np.ndarray:
    """A camera MTF or NPS as a full (ny, nx) float32 grid in fftfreq order.

    ``curve`` may be None (ones), a callable of q = |g|/Nyquist, a 1-D radial profile sampled
    uniformly from q = 0 to q = 1 (extrapolated flat to the corners), or a 2-D array of the
    image shape (fftfreq order) or of its rfft2 half-grid (a real, even curve); a 2-D array of
    another size (e.g. the full frame when an area is restored) is used through its radial
    average. ``name`` is used in error messages.
    """
    if curve is None:
        return np.ones(shape, dtype=np.float32)
    q = _nyquist_fraction(shape)
    if callable(curve):
        out = np.asarray(curve(q), dtype=np.float32)
    else:
        arr = np.asarray(curve, dtype=np.float64)
        if arr.ndim == 1:
            if arr.size < 2:
                raise ValueError(f"{name}: a radial profile needs at least 2 samples")
            out = np.interp(q, np.linspace(0.0, 1.0, arr.size), arr).astype(np.float32)
        elif arr.shape == shape:
            out = arr.astype(np.float32)
        elif arr.shape == (shape[0], shape[1] // 2 + 1):
            out = _rfft_to_full(arr, shape).astype(np.float32)
        elif arr.ndim == 2 and min(arr.shape) >= 4:
            # another image size (e.g. a selected area): use its radial average
            out = np.interp(q, *_radial_profile(arr)).astype(np.float32)
        else:
            raise ValueError(
                f"{name}: expected a 1-D radial profile (0..Nyquist) or a 2-D array (full or "
                f"rfft grid); got shape {arr.shape}"
            )
    if out.shape != shape or not np.all(np.isfinite(out)) or np.any(out < 0):
        raise ValueError(f"{name}: values must be finite and non-negative on the {shape} grid")
    return out


def _radial_profile(arr: np.ndarray, n_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(q, mean value) of a 2-D curve on a full (fftfreq) or rfft grid, q = |g|/Nyquist ≤ 1."""
    ny, nx = arr.shape
    rfft = nx < ny and nx == ny // 2 + 1
    gy = np.fft.fftfreq(ny)[:, None]
    gx = (np.fft.rfftfreq(2 * (nx - 1)) if rfft else np.fft.fftfreq(nx))[None, :]
    q = (np.sqrt(gy**2 + gx**2) / 0.5).ravel()
    keep = q <= 1.0
    which = np.minimum((q[keep] * n_bins).astype(int), n_bins - 1)
    total = np.bincount(which, arr.ravel()[keep], n_bins)
    count = np.maximum(np.bincount(which, None, n_bins), 1)
    return (np.arange(n_bins) + 0.5) / n_bins, total / count


def _rfft_to_full(half: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Expand an rfft2 half-grid of a real even function to the full fftfreq grid."""
    ny, nx = shape
    ky = np.arange(ny)[:, None]
    kx = np.arange(nx)[None, :]
    use_neg = kx > nx // 2
    iy = np.where(use_neg, (-ky) % ny, ky)
    ix = np.where(use_neg, (-kx) % nx, kx)
    return half[iy, ix]


DIAGONAL_Q_MAX = math.sqrt(2.0)  # FTSR / DigitalMicrograph camera profiles span the centre-to-
# corner diagonal (725 px of a 1024² image): q = |g|/Nyquist from 0 to √2, whatever the size
PROFILE_OVERSAMPLING = 8  # a diagonal profile resampled to 0..Nyquist keeps this × its samples
CAMERA_CONVENTIONS = ("nyquist", "diagonal")


def profile_to_nyquist(values: np.ndarray, q_max: float) -> np.ndarray:
    """A 1-D radial profile sampled uniformly over q = 0 … ``q_max`` (in Nyquist units) as the
    profile over 0 … 1 that :func:`camera_curve_to_grid` takes (``PROFILE_OVERSAMPLING`` ×
    finer; the part beyond q = 1, the corners, is left out: the grid extends q = 1 flat)."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size < 2:
        raise ValueError("a radial profile needs at least 2 samples")
    q = np.linspace(0.0, 1.0, PROFILE_OVERSAMPLING * v.size)
    return np.interp(q, np.linspace(0.0, q_max, v.size), v)


def _dm_profile(p: Path, signal: int | None) -> np.ndarray:
    """The 1-D signal of a DigitalMicrograph file (the first one, or ``signal``: its index among
    all the file's signals), via RosettaSciIO."""
    from rsciio.digitalmicrograph import file_reader

    signals = file_reader(str(p))
    if signal is not None:
        if not 0 <= signal < len(signals):
            raise ValueError(f"{p}: signal {signal} out of range 0..{len(signals) - 1}")
        data = np.asarray(signals[signal]["data"])
    else:
        ones = [np.asarray(s["data"]) for s in signals if np.ndim(s["data"]) == 1]
        if not ones:
            shapes = [np.shape(s["data"]) for s in signals]
            raise ValueError(f"{p}: no 1-D profile among its signals {shapes}")
        data = ones[0]
    if data.ndim != 1:
        raise ValueError(f"{p}: signal {signal} is not a 1-D profile (shape {data.shape})")
    return data.astype(np.float64)


def load_camera_curve(
    path: str | Path, *, convention: str | None = None, signal: int | None = None
) -> np.ndarray:
    """Read an MTF/NPS file as a radial profile over 0..Nyquist (or a 2-D grid).

    ``.dm3``/``.dm4``: a DigitalMicrograph 1-D profile (the first 1-D signal, or ``signal``),
    by default in FTSR's diagonal convention (its samples span q = 0 … √2, the
    centre-to-corner diagonal, for any image size). ``.npy``: a 1-D profile or a 2-D grid.
    Text: one column of values, or two columns q/Nyquist and value (resampled to 256
    points). ``convention``: "nyquist" (1-D samples span 0 … Nyquist; the default for .npy and
    text) or "diagonal" (0 … √2; the default for DM files). Returns what
    :func:`camera_curve_to_grid` takes."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"camera curve file not found: {p}")
    dm = p.suffix.lower() in (".dm3", ".dm4")
    conv = convention or ("diagonal" if dm else "nyquist")
    if conv not in CAMERA_CONVENTIONS:
        raise ValueError(f"convention must be one of {CAMERA_CONVENTIONS}; got {convention!r}")
    if dm:
        values = _dm_profile(p, signal)
    elif p.suffix == ".npy":
        values = np.load(p)
    else:
        data = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
        if data.shape[1] == 1:
            values = data[:, 0]
        else:
            q, v = data[:, 0], data[:, 1]
            if np.any(np.diff(q) <= 0):
                raise ValueError(f"{p}: the frequency column must increase")
            return np.interp(np.linspace(0.0, 1.0, 256), q / max(q.max(), 1e-12), v)
    if conv == "diagonal" and np.ndim(values) == 1:
        return profile_to_nyquist(values, DIAGONAL_Q_MAX)
    return values


# --------------------------------------------------------------------------------------------
# data preparation
# --------------------------------------------------------------------------------------------
def normalise_frames(frames: np.ndarray) -> np.ndarray:
    """Each frame divided by its mean (float32); refuses non-positive means."""
    f = np.asarray(frames, dtype=np.float32)
    means = f.mean(axis=(-2, -1), dtype=np.float64)
    if np.any(means <= 0):
        bad = np.flatnonzero(means <= 0).tolist()
        raise ValueError(f"frames {bad} have a non-positive mean: intensities are expected")
    return (f / means[:, None, None].astype(np.float32)).astype(np.float32, copy=False)


def edge_taper(shape: tuple[int, int], width_px: int) -> np.ndarray:
    """A separable raised-cosine window, 1 inside and falling to 0 over ``width_px`` at edges."""

    def ramp(n: int) -> np.ndarray:
        w = np.ones(n, dtype=np.float32)
        m = max(1, min(width_px, n // 4))
        t = 0.5 * (1.0 - np.cos(np.pi * (np.arange(m) + 0.5) / m))
        w[:m] = t
        w[-m:] = t[::-1]
        return w

    return ramp(shape[0])[:, None] * ramp(shape[1])[None, :]


def frame_spectra(frames: np.ndarray, taper_px: int = 0) -> np.ndarray:
    """FFTs (complex64) of mean-normalised frames minus 1, optionally edge-tapered."""
    f = normalise_frames(frames)  # a new array: changed in place below (no stack-size copies)
    f -= np.float32(1.0)
    if taper_px > 0:
        f *= edge_taper(f.shape[-2:], taper_px)
    return sfft.fft2(f.astype(np.complex64), workers=fft_workers(), overwrite_x=True)


def crop_area(frames: np.ndarray, area: tuple[int, int, int, int] | None) -> np.ndarray:
    """frames[..., y0:y0+h, x0:x0+w] with the area checked against the frame shape."""
    if area is None:
        return frames
    y0, x0, h, w = (int(v) for v in area)
    ny, nx = frames.shape[-2:]
    if h < 16 or w < 16 or y0 < 0 or x0 < 0 or y0 + h > ny or x0 + w > nx:
        raise ValueError(
            f"area (y0, x0, h, w) = {area} must lie inside the {ny}×{nx} frames and be at "
            "least 16×16 px"
        )
    return frames[..., y0 : y0 + h, x0 : x0 + w]


def _gradient_extremes(
    optics: Optics, grid: FrequencyGrid, defocus_nm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) |∇χ|² over the series' defoci, element by element: the first gives
    the largest spatial envelope (E_s falls with |∇χ|²: one exp instead of one per image), the
    second the largest delocalisation."""
    g2_min = g2_max = chi_gradient_sq(optics, grid, float(defocus_nm[0]))
    for d in defocus_nm[1:]:
        g2 = chi_gradient_sq(optics, grid, float(d))
        g2_min, g2_max = np.minimum(g2_min, g2), np.maximum(g2_max, g2)
    return g2_min, g2_max


def information_band(
    optics: Optics,
    grid: FrequencyGrid,
    defocus_nm: np.ndarray,
    camera: np.ndarray,
    threshold: float = 1e-3,
    k_min_px: float = 0.0,
    max_delocalisation_fraction: float | None = None,
) -> SpectralBand:
    """Frequencies where some image's |T|·C exceeds ``threshold`` (excluding g = 0).

    With ``max_delocalisation_fraction`` f, frequencies whose image delocalisation
    R(k) = |∇_k χ|/2π (Å) exceeds f × the field size in any image are left out too: their
    content comes from outside the field and is inconsistent between defoci.
    """
    dfs = np.asarray(defocus_nm, dtype=np.float64).reshape(-1)
    env = aperture(optics, grid) * temporal_envelope(optics, grid)
    limit = max_delocalisation_fraction is not None
    if optics.beam_divergence_mrad > 0 or limit:
        g2_min, g2_max = _gradient_extremes(optics, grid, dfs)
        env = env * spatial_envelope_of_gradient(optics, g2_min)
    mask = (env * camera) > threshold
    if limit:
        field_A = 10.0 * min(s * p for s, p in zip(grid.shape, grid.pixel_nm, strict=True))
        mask &= np.sqrt(g2_max) / (2.0 * math.pi) <= max_delocalisation_fraction * field_A
    q_px = np.hypot(np.fft.fftfreq(grid.shape[0])[:, None] * grid.shape[0],
                    np.fft.fftfreq(grid.shape[1])[None, :] * grid.shape[1])  # fmt: skip
    mask &= q_px > max(k_min_px, 0.5)
    return SpectralBand.from_mask(mask)
