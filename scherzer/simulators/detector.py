"""Camera model: dose → Poisson electrons → detector blur (MTF/NPS) → gain, readout, offset.

Units: intensities are relative to vacuum (vacuum = 1); dose in e/Å²; pixel size in nm at the
boundary and Å inside; counts are ADU. Spatial frequencies here are in units of the detector
Nyquist frequency, ``f = q / q_Nyquist`` ∈ [0, 1] along an axis (f = 1 at 0.5 cycles/pixel).

Model (stated once, used by :meth:`CameraModel.expose`, :meth:`CameraModel.mtf`,
:meth:`CameraModel.nps`):

* Expected electrons per (physical) pixel: λ = dose · pixel_area_Å² · intensity.
* Electrons N ~ Poisson(λ) independently per pixel.
* Signal transfer (MTF, applied to λ): MTF(f_y, f_x) = B(f) · sinc(f_y/2) · sinc(f_x/2) where
  f = √(f_y² + f_x²), sinc(u) = sin(πu)/(πu) is the pixel-aperture term and B is the detector
  spread ("modified Lorentzian": a Lorentzian plus an unblurred fraction)::

      B(f) = (1 − c) / (1 + (f / f½)²) + c        (c = ``mtf_sharp_fraction``,
                                                  f½ = ``mtf_half_width_nyquist``)

* Noise transfer (applied to the shot noise N − λ): NTF(f) = B(f) (the spread blurs each
  electron; the shot noise is white before it). Hence the noise power spectrum of a flat field
  (counts² per pixel, spectral density normalised so its mean over the band is the variance)::

      NPS(f) = g² · λ · B(f)² + σ_r²

  with gain g = ``gain_counts_per_e`` and readout noise σ_r (counts, per read-out pixel).
* Optional measured curves: ``mtf_table`` (total MTF, sampled uniformly on f ∈ [0, 1], used
  radially in place of B·sinc) and ``nps_table`` (NPS(f)/NPS_shot(0) of the shot noise,
  likewise; its square root is used as the NTF).
* ``mtf_model="none"`` turns blur off (MTF = NTF = 1): variance = g²λ + σ_r² (+1/12 rounding).
* Then: counts = round(g · e + σ_r · n + offset), n ~ N(0, 1), clipped to
  [0, 2^bit_depth − 1], where e = F⁻¹[MTF · F(λ) + NTF · F(N − λ)] (electrons after blur).
  ``binning`` b sums b×b physical pixels before read-out (readout noise once per binned pixel).
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numba
import numpy as np
import scipy.fft as sfft
from pydantic import BaseModel, ConfigDict, Field, field_validator

from scherzer.optics import fft_workers

__all__ = ["CameraModel"]


class CameraModel(BaseModel):
    """A TEM camera (defaults: a scintillator-coupled CMOS/CCD at moderate gain)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gain_counts_per_e: float = Field(2.0, gt=0, description="ADU per incident electron")
    offset_counts: float = Field(100.0, ge=0, description="dark offset, ADU")
    readout_noise_counts: float = Field(2.0, ge=0, description="std. dev., ADU per pixel")
    mtf_model: Literal["lorentzian", "none", "table"] = "lorentzian"
    mtf_sharp_fraction: float = Field(0.3, ge=0, le=1, description="c: unblurred fraction")
    mtf_half_width_nyquist: float = Field(0.5, gt=0, description="f½ of the Lorentzian")
    mtf_table: tuple[float, ...] | None = Field(
        None, description="measured total MTF on f = linspace(0, 1, len) (mtf_model='table')"
    )
    nps_table: tuple[float, ...] | None = Field(
        None, description="measured shot-noise NPS(f)/NPS(0) on f = linspace(0, 1, len)"
    )
    bit_depth: int = Field(16, ge=1, le=32)
    binning: int = Field(1, ge=1, le=16)

    @field_validator("mtf_table", "nps_table")
    @classmethod
    def _check_table(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is None:
            return v
        arr = np.asarray(v, dtype=float)
        if arr.size < 2 or not np.all(np.isfinite(arr)) or np.any(arr < 0) or arr[0] <= 0:
            raise ValueError("tables need ≥ 2 finite, non-negative samples with a positive f=0")
        return tuple(float(x) for x in arr)

    # ------------------------------------------------------------------ model curves
    @property
    def saturation_counts(self) -> int:
        return 2**self.bit_depth - 1

    def _spread(self, f: np.ndarray) -> np.ndarray:
        """B(f): detector spread only (no pixel aperture)."""
        if self.mtf_model != "lorentzian":
            return np.ones_like(f)
        c, h = self.mtf_sharp_fraction, self.mtf_half_width_nyquist
        return (1.0 - c) / (1.0 + (f / h) ** 2) + c

    @staticmethod
    def _table(table: tuple[float, ...], f: np.ndarray) -> np.ndarray:
        t = np.asarray(table, dtype=float)
        return np.interp(f, np.linspace(0.0, 1.0, t.size), t / t[0])

    def mtf(self, q_nyquist_fraction: np.ndarray | float) -> np.ndarray:
        """Total MTF along an image axis at f = q/q_Nyquist (B(f)·sinc(f/2); 1 at f = 0)."""
        f = np.abs(np.asarray(q_nyquist_fraction, dtype=np.float64))
        if self.mtf_model == "none":
            return np.ones_like(f)
        if self.mtf_model == "table":
            if self.mtf_table is None:
                raise ValueError("mtf_model='table' needs mtf_table")
            return self._table(self.mtf_table, f)
        return self._spread(f) * _sinc_axis(f)

    def ntf(self, q_nyquist_fraction: np.ndarray | float) -> np.ndarray:
        """Noise transfer function (amplitude) at f: B(f), or √(nps_table) if given."""
        f = np.abs(np.asarray(q_nyquist_fraction, dtype=np.float64))
        if self.nps_table is not None:
            return np.sqrt(self._table(self.nps_table, f))
        if self.mtf_model == "table":
            return self.mtf(f)
        return self._spread(f)

    def nps(
        self, q_nyquist_fraction: np.ndarray | float, mean_electrons_per_pixel: float
    ) -> np.ndarray:
        """Flat-field noise power spectrum g²·λ·NTF(f)² + σ_r² in counts² (per read-out pixel).

        ``mean_electrons_per_pixel`` is λ per read-out pixel (after binning).
        """
        ntf = self.ntf(q_nyquist_fraction)
        g = self.gain_counts_per_e
        return g * g * mean_electrons_per_pixel * ntf**2 + self.readout_noise_counts**2

    def mtf_2d(self, shape: tuple[int, int], rfft: bool = True) -> np.ndarray:
        """Total MTF B(f)·sinc(f_y/2)·sinc(f_x/2) on an FFT grid of ``shape`` (read-out
        pixels), float32; rfft2 layout by default, full fft2 (fftfreq order) with rfft=False."""
        fy, fx = _nyquist_fractions(shape, rfft)
        f = np.sqrt(fy**2 + fx**2)
        if self.mtf_model == "none":
            return np.ones(f.shape, dtype=np.float32)
        if self.mtf_model == "table":
            return self.mtf(np.minimum(f, 1.0)).astype(np.float32)
        return (self._spread(f) * _sinc_axis(fy) * _sinc_axis(fx)).astype(np.float32)

    def ntf_2d(self, shape: tuple[int, int], rfft: bool = True) -> np.ndarray:
        """Noise transfer (amplitude) on an FFT grid of ``shape``, float32 (layout as mtf_2d)."""
        fy, fx = _nyquist_fractions(shape, rfft)
        f = np.sqrt(fy**2 + fx**2)
        if self.nps_table is not None:
            return np.sqrt(self._table(self.nps_table, np.minimum(f, 1.0))).astype(np.float32)
        if self.mtf_model == "table":
            return self.mtf_2d(shape, rfft)
        return self._spread(f).astype(np.float32)

    def shift_bound_px(
        self, intensity: np.ndarray, dose_e_per_A2: float, pixel_nm: float
    ) -> tuple[float, float]:
        """Cramér–Rao bound (standard deviation, read-out pixels) on the (dy, dx) shift of one
        exposure of ``intensity`` (vacuum = 1) measured against its noise-free self.

        Fisher information F_a = Σ_k (2π k_a)² |g·MTF(k)·Λ(k)|² / (N_px·NPS(k)), with Λ the DFT
        of the expected electrons per read-out pixel, k in cycles/pixel and NPS the flat-field
        noise power at the mean electron count (the Gaussian approximation of the Poisson and
        readout noise). No estimator that compares a frame with a perfect template does
        better; one that compares noisy frames does worse.
        """
        img = _check_image(intensity).astype(np.float64)
        lam = np.maximum(img, 0.0) * self.electrons_per_pixel(dose_e_per_A2, pixel_nm)
        lam = self._bin(lam)
        shape = lam.shape
        signal = np.fft.fft2(lam - lam.mean()) * self.mtf_2d(shape, rfft=False)
        fy, fx = _nyquist_fractions(shape, rfft=False)
        nps = self.nps(np.sqrt(fy**2 + fx**2), float(lam.mean())) * lam.size
        density = np.abs(self.gain_counts_per_e * signal) ** 2 / np.maximum(nps, 1e-30)
        ky, kx = fy / 2.0, fx / 2.0  # cycles per pixel
        info = [float(np.sum((2.0 * np.pi * k) ** 2 * density)) for k in (ky, kx)]
        return tuple(1.0 / math.sqrt(f) if f > 0 else math.inf for f in info)  # type: ignore[return-value]

    def _bin(self, lam: np.ndarray) -> np.ndarray:
        """Sum ``binning`` × ``binning`` physical pixels into read-out pixels (edges dropped)."""
        b = self.binning
        if b == 1:
            return lam
        ny, nx = (s // b * b for s in lam.shape)
        return lam[:ny, :nx].reshape(ny // b, b, nx // b, b).sum(axis=(1, 3))

    # ------------------------------------------------------------------ exposure
    def electrons_per_pixel(self, dose_e_per_A2: float, pixel_nm: float) -> float:
        """Mean electrons per physical pixel in vacuum: dose × (10·pixel_nm)²."""
        return float(dose_e_per_A2) * (float(pixel_nm) * 10.0) ** 2

    def expose(
        self,
        intensity: np.ndarray,
        dose_e_per_A2: float,
        pixel_nm: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Integer-valued camera counts (float32) of an intensity image (vacuum = 1).

        ``intensity`` (ny, nx) on the physical pixel grid of ``pixel_nm``; the result is
        (ny // binning, nx // binning). See the module docstring for the model.
        """
        img = _check_image(intensity)
        if not (math.isfinite(dose_e_per_A2) and dose_e_per_A2 >= 0):
            raise ValueError(f"dose_e_per_A2 must be ≥ 0 and finite; got {dose_e_per_A2!r}")
        if not (math.isfinite(pixel_nm) and pixel_nm > 0):
            raise ValueError(f"pixel_nm must be positive; got {pixel_nm!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError("rng must be a numpy.random.Generator (np.random.default_rng(seed))")
        lam = img * np.float32(self.electrons_per_pixel(dose_e_per_A2, pixel_nm))
        np.maximum(lam, 0.0, out=lam)
        lam = self._bin(lam)
        seed = int(rng.integers(0, 2**63 - 1, dtype=np.int64))
        electrons = np.empty_like(lam)
        _in_row_blocks(_poisson, (lam, electrons), seed)
        if self.mtf_model != "none" or self.nps_table is not None:
            electrons = self._blur(lam, electrons)
        return self._readout(electrons, rng)

    def _readout(self, electrons: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """counts = clip(round(g·e + σ_r·n + offset), 0, 2^bits − 1), n ~ N(0, 1)."""
        out = electrons * np.float32(self.gain_counts_per_e)
        out += np.float32(self.offset_counts)
        if self.readout_noise_counts > 0:
            noise = rng.standard_normal(out.shape, dtype=np.float32)
            noise *= np.float32(self.readout_noise_counts)
            out += noise
        np.rint(out, out=out)
        return np.clip(out, 0.0, float(self.saturation_counts), out=out)

    def _transfer_2d(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(NTF, MTF − NTF) on the rfft grid of ``shape``, cached per camera and shape."""
        key = (self.model_dump_json(), tuple(shape))
        hit = _TRANSFER_CACHE.get(key)
        if hit is None:
            ntf = self.ntf_2d(shape)
            hit = (ntf, self.mtf_2d(shape) - ntf)
            if len(_TRANSFER_CACHE) > 16:
                _TRANSFER_CACHE.clear()
            _TRANSFER_CACHE[key] = hit
        return hit

    def _blur(self, lam: np.ndarray, electrons: np.ndarray) -> np.ndarray:
        """e = F⁻¹[NTF·F(N) + (MTF − NTF)·F(λ)] (signal by MTF, shot noise by NTF)."""
        w = fft_workers()
        ntf, diff = self._transfer_2d(lam.shape)
        spec = sfft.rfft2(electrons, workers=w)
        spec *= ntf
        spec += sfft.rfft2(lam, workers=w) * diff
        return sfft.irfft2(spec, s=lam.shape, workers=w).astype(np.float32)


_TRANSFER_CACHE: dict[tuple[str, tuple[int, int]], tuple[np.ndarray, np.ndarray]] = {}


def _sinc_axis(f: np.ndarray) -> np.ndarray:
    """Pixel-aperture MTF along one axis at Nyquist fraction f: sinc(f/2) = sin(πf/2)/(πf/2)."""
    return np.sinc(np.asarray(f, dtype=np.float64) / 2.0)


def _nyquist_fractions(shape: tuple[int, int], rfft: bool = True) -> tuple[np.ndarray, ...]:
    """|f_y| (ny, 1) and |f_x| (1, nx') as fractions of Nyquist (fftfreq / rfftfreq order)."""
    fy = np.abs(np.fft.fftfreq(shape[0]))[:, None] * 2.0
    fx = np.fft.rfftfreq(shape[1]) if rfft else np.abs(np.fft.fftfreq(shape[1]))
    return fy, fx[None, :] * 2.0


def _check_image(intensity: np.ndarray) -> np.ndarray:
    arr = np.asarray(intensity)
    if arr.ndim != 2 or arr.dtype.kind not in "iuf":
        raise ValueError(
            f"intensity must be a real 2-D image (ny, nx); got {arr.dtype} shape {arr.shape}"
        )
    out = np.array(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("intensity contains non-finite values")
    return out


# Counter-based random numbers: pixel i of a frame draws from its own SplitMix64 stream seeded by
# (seed, i), so results are reproducible and independent of the number of threads.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@numba.njit(inline="always")
def _next(state):  # pragma: no cover - numba
    """SplitMix64 step: (new state, uniform in (0, 1))."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return state, (np.int64(z >> np.uint64(11)) + 1) * (1.0 / 9007199254740993.0)


@numba.njit(inline="always")
def _stream(seed, i):  # pragma: no cover - numba
    s = np.uint64(seed) ^ (np.uint64(i) * _MIX2)
    s, _ = _next(s)
    return s


@numba.njit(inline="always")
def _poisson_one(lam, state):  # pragma: no cover - numba
    """One Poisson(λ) draw: inversion by multiplication for λ < 10, else Hörmann's PTRS (1993)."""
    if lam <= 0.0:
        return state, 0.0
    if lam < 10.0:
        limit = math.exp(-lam)
        prod = 1.0
        k = -1.0
        while True:
            state, u = _next(state)
            prod *= u
            k += 1.0
            if prod <= limit:
                return state, k
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state, u = _next(state)
        state, v = _next(state)
        u -= 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:  # fast acceptance (~86 %)
            return state, k
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        lhs = math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)
        if lhs <= -lam + k * math.log(lam) - math.lgamma(k + 1.0):
            return state, k


@numba.njit(cache=True, nogil=True)
def _poisson(lam, out, row0, seed):  # pragma: no cover - numba
    """Poisson(λ) per pixel into ``out``; each pixel draws from its own stream keyed by its
    global index ((row0 + r)·nx + c), so the result does not depend on how rows are split."""
    ny, nx = lam.shape
    for r in range(ny):
        for c in range(nx):
            state = _stream(seed, (row0 + r) * nx + c)
            _, k = _poisson_one(float(lam[r, c]), state)
            out[r, c] = k


_POOL: ThreadPoolExecutor | None = None


def _in_row_blocks(kernel, arrays: tuple[np.ndarray, ...], *scalars) -> None:
    """Run a nogil kernel on row blocks of ``arrays`` on all cores (results independent of the
    split): kernel(*blocks, first_row, *scalars)."""
    global _POOL
    rows = arrays[0].shape[0]
    n_threads = min(fft_workers(), max(1, rows // 64))
    if n_threads == 1:
        kernel(*arrays, 0, *scalars)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=fft_workers(), thread_name_prefix="camera")
    edges = np.linspace(0, rows, n_threads + 1).astype(int)
    futures = [
        _POOL.submit(kernel, *(x[a:b] for x in arrays), int(a), *scalars)
        for a, b in itertools.pairwise(edges)
    ]
    for f in futures:
        f.result()
