"""HRTEM image formation: exit wave → aberrations → partial coherence → vibration → camera.

Units: nm at the boundary (``defocus_nm``, ``pixel_nm``, ``shift_nm``), Å inside (through
:mod:`scherzer.optics`). Intensities are relative to vacuum (vacuum = 1).

Pipeline (per frame, after one exit-wave calculation per specimen):

1. Exit wave ψ(r) of the specimen (:func:`scherzer.simulators.specimen.exit_wave`; multislice by
   default) on a field larger than the image by ``margin_px`` on every side.
2. Specimen drift: ψ(k) · exp(−2πi k·s) — an exact sub-pixel shift s (content moves by +s,
   frame(r) = ref(r − s)) on the large field; the image is cropped from its centre afterwards,
   so as long as |s| < margin nothing wraps into the image.
3. Aberrations and partial coherence via :func:`scherzer.optics.wave_transfer`:
   * ``coherence="quasi"`` (default): ψ_img(k) = ψ(k) A(k) E_t(k) E_s(k) exp(−iχ(k)) — the
     quasi-coherent approximation, the temporal (focal spread, a standard deviation) and spatial
     (beam divergence, 1/e semi-angle) envelopes multiply the wave (linear-imaging limit).
   * ``coherence="incoherent"``: the focal spread is integrated incoherently,
     I = Σ_j w_j |F⁻¹[ψ A E_s(Δf_j) exp(−iχ(Δf_j))]|² over Gauss–Hermite nodes Δf_j = Δf +
     √2 σ_f x_j (weights w_j/√π), which is exact for strong objects (non-linear terms); the
     spatial envelope stays quasi-coherent.
4. Vibration: the intensity is blurred by E_v(k) = exp(−2π² σ_v² k²) (optics.vibration_nm).
5. Camera (:class:`scherzer.simulators.detector.CameraModel`): dose → Poisson → MTF/NPS →
   gain, readout noise, offset → integer counts.
"""

from __future__ import annotations

import math
import time as _time

import numpy as np
import scipy.fft as sfft

from scherzer.optics import (
    FrequencyGrid,
    Optics,
    fft_workers,
    focal_spread_nodes,
    vibration_envelope,
    wave_transfer,
)
from scherzer.simulators.detector import CameraModel
from scherzer.simulators.specimen import Specimen, exit_wave, make_specimen
from scherzer.stack import FrameRecord, ImageStack

__all__ = ["HRTEMImager", "default_hrtem_optics", "simulate_focal_series"]

# Pixels (frames × field) per batched transfer/FFT: bounds the peak memory (~25 bytes/pixel in
# optics' float64 temporaries, ≈ 100 MB) while amortising the per-call cost of the transfer.
_CHUNK_PIXELS = 2**22


def default_hrtem_optics() -> Optics:
    """A realistic 300 kV HRTEM: Cs 0.6 mm, σ_f 2.8 nm (≈ 0.1 nm information limit),
    0.15 mrad divergence, 0.01 nm vibration."""
    return Optics(
        voltage_kv=300.0,
        cs_mm=0.6,
        focal_spread_nm=2.8,
        beam_divergence_mrad=0.15,
        vibration_nm=0.01,
    )


class HRTEMImager:
    """Images of one specimen under changing optics, defocus and drift (exit wave computed once).

    ``shape`` (ny, nx) and ``pixel_nm`` describe the image; the exit wave is computed on
    (ny + 2·margin_px, nx + 2·margin_px) pixels centred on the specimen field.
    ``coherence``: "quasi" or "incoherent" (module docstring); ``focal_nodes``: Gauss–Hermite
    nodes for the incoherent mode (None: enough to resolve the focal average up to the wave's
    band limit, see :meth:`_n_focal_nodes`).
    """

    def __init__(
        self,
        specimen: Specimen,
        optics: Optics,
        shape: tuple[int, int],
        pixel_nm: float,
        camera: CameraModel | None = None,
        *,
        margin_px: int = 32,
        coherence: str = "quasi",
        exit_wave_method: str = "multislice",
        focal_nodes: int | None = None,
    ) -> None:
        if not isinstance(specimen, Specimen):
            raise TypeError(f"specimen must be a Specimen; got {type(specimen).__name__}")
        if not isinstance(optics, Optics):
            raise TypeError(f"optics must be an Optics model; got {type(optics).__name__}")
        if coherence not in ("quasi", "incoherent"):
            raise ValueError(f"coherence must be 'quasi' or 'incoherent'; got {coherence!r}")
        if not (isinstance(margin_px, int) and margin_px >= 0):
            raise ValueError(f"margin_px must be an integer ≥ 0; got {margin_px!r}")
        if focal_nodes is not None and not (isinstance(focal_nodes, int) and focal_nodes >= 1):
            raise ValueError(f"focal_nodes must be None or an integer ≥ 1; got {focal_nodes!r}")
        try:
            ny, nx = (int(v) for v in shape)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"shape must be (ny, nx); got {shape!r}") from exc
        if ny < 8 or nx < 8:
            raise ValueError(f"shape must be at least 8×8; got {shape!r}")
        if not (isinstance(pixel_nm, int | float) and math.isfinite(pixel_nm) and pixel_nm > 0):
            raise ValueError(f"pixel_nm must be a positive number; got {pixel_nm!r}")
        self.specimen = specimen
        self.optics = optics
        self.shape = (ny, nx)
        self.pixel_nm = float(pixel_nm)
        self.camera = camera if camera is not None else CameraModel()
        self.margin_px = margin_px
        self.coherence = coherence
        self.focal_nodes = focal_nodes
        self.exit_wave_method = exit_wave_method
        self.big_shape = (ny + 2 * margin_px, nx + 2 * margin_px)
        t0 = _time.perf_counter()
        self.wave = exit_wave(
            specimen, self.big_shape, self.pixel_nm, optics.voltage_kv, method=exit_wave_method
        )
        self.exit_wave_seconds = _time.perf_counter() - t0
        self.wave_fft = sfft.fft2(self.wave, workers=fft_workers()).astype(np.complex64)
        self.grid = FrequencyGrid(self.big_shape, (self.pixel_nm, self.pixel_nm))
        self._transfer_cache: dict[tuple[str, float], np.ndarray] = {}

    # ------------------------------------------------------------------ helpers
    def cropped_exit_wave(self) -> np.ndarray:
        """The exit wave on the image field (zero shift), complex64."""
        m = self.margin_px
        return np.ascontiguousarray(self.wave[m : m + self.shape[0], m : m + self.shape[1]])

    def _optics_for(self, optics: Optics | None) -> Optics:
        if optics is None:
            return self.optics
        if not isinstance(optics, Optics):
            raise TypeError(f"optics must be an Optics model; got {type(optics).__name__}")
        if optics.voltage_kv != self.optics.voltage_kv:
            raise ValueError(
                f"optics voltage {optics.voltage_kv} kV differs from the exit wave's "
                f"{self.optics.voltage_kv} kV; build a new HRTEMImager for another voltage"
            )
        return optics

    def _shifts(self, shift_nm: np.ndarray | None, n: int) -> np.ndarray:
        if shift_nm is None:
            return np.zeros((n, 2))
        s = np.asarray(shift_nm, dtype=np.float64)
        if s.shape == (2,) and n == 1:
            s = s[None]
        if s.shape != (n, 2) or not np.all(np.isfinite(s)):
            raise ValueError(f"shift_nm must be finite (n, 2) = ({n}, 2) (dy, dx); got {s.shape}")
        limit = (self.margin_px - 1) * self.pixel_nm
        if np.any(np.abs(s) > limit):
            raise ValueError(
                f"shift up to {np.abs(s).max():.3f} nm exceeds the margin ({limit:.3f} nm): "
                "content would wrap; construct the imager with a larger margin_px"
            )
        return s

    def _ramps(self, shift_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Separable exp(−2πi k·s): (n, NY, 1) and (n, 1, NX) complex64 (k in 1/Å, s in Å)."""
        s_A = shift_nm * 10.0
        ry = np.exp(-2j * np.pi * self.grid.ky[None, :, :] * s_A[:, 0, None, None])
        rx = np.exp(-2j * np.pi * self.grid.kx[None, :, :] * s_A[:, 1, None, None])
        return ry.astype(np.complex64), rx.astype(np.complex64)

    def _image(self, t: np.ndarray, ramps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """|F⁻¹[ψ(k) · ramp(k) · T(k)]|² for a batch of transfer functions T (consumed)."""
        t *= self.wave_fft
        t *= ramps[0]
        t *= ramps[1]
        img = sfft.ifft2(t, axes=(-2, -1), workers=fft_workers(), overwrite_x=True)
        out = np.square(img.real)
        out += np.square(img.imag)
        return out.astype(np.float32, copy=False)

    def _transfer(self, opt: Optics, dfs: np.ndarray) -> np.ndarray:
        """Quasi-coherent wave transfer (n, NY, NX) (a fresh array: callers may modify it).

        Single-defocus transfers are cached (last few optics/defocus pairs), which makes
        repeated frames at one focus — live view — cheaper.
        """
        if len(dfs) != 1:
            return wave_transfer(opt, self.grid, dfs, envelopes=True)
        key = (opt.model_dump_json(exclude={"defocus_nm"}), float(dfs[0]))
        hit = self._transfer_cache.pop(key, None)
        if hit is None:
            hit = wave_transfer(opt, self.grid, dfs, envelopes=True)
        self._transfer_cache[key] = hit
        while len(self._transfer_cache) > 4:
            self._transfer_cache.pop(next(iter(self._transfer_cache)))
        return hit.copy()

    def _coherent_images(
        self, opt: Optics, dfs: np.ndarray, ramps: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        if self.coherence == "quasi" or opt.focal_spread_nm == 0:
            return self._image(self._transfer(opt, dfs), ramps)
        offsets, w = focal_spread_nodes(opt.focal_spread_nm, self._n_focal_nodes(opt))
        sharp = opt.with_(focal_spread_nm=0.0)
        out = np.zeros((len(dfs), *self.big_shape), dtype=np.float32)
        for dj, wj in zip(offsets, w, strict=True):
            t = wave_transfer(sharp, self.grid, dfs + dj, envelopes=True)
            out += np.float32(wj) * self._image(t, ramps)
        return out

    def _n_focal_nodes(self, opt: Optics) -> int:
        """Gauss–Hermite nodes that resolve the focal average up to the wave's band limit.

        The phase of a beam at k varies over the nodes as ω x with ω = π λ √2 σ_f k²; a
        Gauss–Hermite rule of n nodes integrates exp(iωx) e^(−x²) to < 1e-3 for ω ≲ n/3, so
        n = 3 ω(k_max) (k_max = 2/3 Nyquist for multislice waves, Nyquist otherwise), 5…64.
        """
        if self.focal_nodes is not None:
            return self.focal_nodes
        k_max = self.grid.nyquist_per_A * (
            2.0 / 3.0 if self.exit_wave_method == "multislice" else 1
        )
        omega = math.pi * opt.wavelength_A * math.sqrt(2.0) * opt.focal_spread_nm * 10.0 * k_max**2
        return int(min(64, max(5, math.ceil(3.0 * omega))))

    def _vibrate(self, opt: Optics, img: np.ndarray) -> np.ndarray:
        if opt.vibration_nm <= 0:
            return img
        rgrid = FrequencyGrid(self.big_shape, (self.pixel_nm, self.pixel_nm), rfft=True)
        w = fft_workers()
        spec = sfft.rfft2(img, axes=(-2, -1), workers=w) * vibration_envelope(opt, rgrid)
        return sfft.irfft2(spec, s=self.big_shape, axes=(-2, -1), workers=w).astype(np.float32)

    # ------------------------------------------------------------------ public
    def noiseless(
        self,
        defocus_nm: float | np.ndarray,
        shift_nm: np.ndarray | None = None,
        optics: Optics | None = None,
    ) -> np.ndarray:
        """Noise-free intensities (n, ny, nx) float32 (vacuum = 1) for n defoci.

        ``defocus_nm`` scalar or (n,) replaces the optics' defocus (negative = underfocus);
        ``shift_nm`` (n, 2) (dy, dx) is the specimen displacement in nm per image.
        """
        dfs = np.atleast_1d(np.asarray(defocus_nm, dtype=np.float64))
        if dfs.ndim != 1 or not np.all(np.isfinite(dfs)):
            raise ValueError(f"defocus_nm must be a finite scalar or 1-D array; got {defocus_nm}")
        opt = self._optics_for(optics)
        shifts = self._shifts(shift_nm, len(dfs))
        ny, nx = self.shape
        m = self.margin_px
        out = np.empty((len(dfs), ny, nx), dtype=np.float32)
        chunk = max(1, _CHUNK_PIXELS // (self.big_shape[0] * self.big_shape[1]))
        for i in range(0, len(dfs), chunk):
            sl = slice(i, i + chunk)
            img = self._coherent_images(opt, dfs[sl], self._ramps(shifts[sl]))
            img = self._vibrate(opt, img)
            out[sl] = img[:, m : m + ny, m : m + nx]
        return out

    def frame(
        self,
        defocus_nm: float,
        shift_nm: tuple[float, float],
        dose_e_per_A2: float,
        rng: np.random.Generator,
        optics: Optics | None = None,
    ) -> tuple[np.ndarray, dict]:
        """One camera frame (counts, float32 integer-valued) and its ground truth.

        Truth: ``defocus_nm``, ``shift_nm`` (dy, dx), ``shift_px`` (in read-out pixels, i.e.
        after binning), ``dose_e_per_A2``, ``electrons_per_pixel_vacuum`` (physical pixel) and
        the effective ``optics``.
        """
        intensity = self.noiseless(defocus_nm, np.asarray(shift_nm, dtype=float)[None], optics)[0]
        counts = self.camera.expose(intensity, dose_e_per_A2, self.pixel_nm, rng)
        s = np.asarray(shift_nm, dtype=float)
        truth = {
            "defocus_nm": float(defocus_nm),
            "shift_nm": s.tolist(),
            "shift_px": (s / (self.pixel_nm * self.camera.binning)).tolist(),
            "dose_e_per_A2": float(dose_e_per_A2),
            "electrons_per_pixel_vacuum": self.camera.electrons_per_pixel(
                dose_e_per_A2, self.pixel_nm
            ),
            "optics": self._optics_for(optics).model_dump(),
        }
        return counts, truth


def _drift_shifts_px(
    n: int,
    drift_px_per_frame: tuple[float, float],
    jitter_px: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Content positions (n, 2) in px relative to t = 0: steady drift plus jitter (frame 0 = 0)."""
    steps = np.arange(n, dtype=np.float64)[:, None] * np.asarray(drift_px_per_frame, dtype=float)
    jitter = rng.normal(0.0, jitter_px, size=(n, 2)) if jitter_px > 0 else np.zeros((n, 2))
    jitter[0] = 0.0
    return steps + jitter


def simulate_focal_series(
    specimen: str | Specimen = "crystal_edge",
    *,
    n: int = 11,
    start_nm: float = -150.0,
    step_nm: float = 10.0,
    step_error_fraction: float = 0.0,
    optics: Optics | None = None,
    a1_nm: float = 0.0,
    a1_deg: float = 0.0,
    dose_e_per_A2: float = 500.0,
    drift_px_per_frame: tuple[float, float] = (0.7, -0.4),
    drift_jitter_px: float = 0.3,
    focal_drift_nm_per_frame: float = 0.0,
    size: int = 256,
    pixel_nm: float = 0.02,
    camera: CameraModel | None = None,
    seed: int = 0,
) -> ImageStack:
    """A simulated HRTEM focal series with ground truth (see module docstring for the physics).

    Frame i has nominal defocus start + i·step; the true defocus is
    start + i·step·(1 + step_error_fraction) + i·focal_drift_nm_per_frame; the read-back is the
    nominal value plus 0.2 nm (std) noise. ``ground_truth``: ``defocus_nm`` (n,), ``shifts_px``
    (n, 2) content positions relative to the specimen at t = 0 (ARCHITECTURE convention),
    ``exit_wave`` (complex64, image field, zero shift), ``a1_nm``, ``a1_deg`` and ``noiseless``
    (n, size, size) when n·size² ≤ 2²².
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive integer; got {n!r}")
    if not (isinstance(size, int) and size >= 16):
        raise ValueError(f"size must be an integer ≥ 16; got {size!r}")
    if not dose_e_per_A2 > 0:
        raise ValueError(f"dose_e_per_A2 must be positive; got {dose_e_per_A2!r}")
    rng = np.random.default_rng(seed)
    base = optics if optics is not None else default_hrtem_optics()
    opt = base.with_(defocus_nm=0.0, a1_nm=a1_nm, a1_deg=a1_deg)
    shifts_px = _drift_shifts_px(n, drift_px_per_frame, drift_jitter_px, rng)
    margin = max(32, math.ceil(np.abs(shifts_px).max()) + 8)
    if isinstance(specimen, str):
        field_nm = ((size + 2 * margin) * pixel_nm,) * 2
        specimen = make_specimen(specimen, field_nm, seed=seed)
    imager = HRTEMImager(specimen, opt, (size, size), pixel_nm, camera, margin_px=margin)
    idx = np.arange(n, dtype=np.float64)
    nominal = start_nm + idx * step_nm
    true_df = (
        start_nm + idx * step_nm * (1.0 + step_error_fraction) + idx * focal_drift_nm_per_frame
    )
    readback = nominal + rng.normal(0.0, 0.2, size=n)
    clean = imager.noiseless(true_df, shifts_px * pixel_nm)
    frames = np.stack([imager.camera.expose(c, dose_e_per_A2, pixel_nm, rng) for c in clean])
    exposure_s, interval_s = 1.0, 2.0
    records = [
        FrameRecord(
            index=i,
            time_s=i * interval_s,
            defocus_nominal_nm=float(nominal[i]),
            defocus_readback_nm=float(readback[i]),
            exposure_s=exposure_s,
            dose_e_per_A2=float(dose_e_per_A2),
            signal="HRTEM",
        )
        for i in range(n)
    ]
    truth = {
        "defocus_nm": true_df,
        "shifts_px": shifts_px / imager.camera.binning,
        "exit_wave": imager.cropped_exit_wave(),
        "a1_nm": float(a1_nm),
        "a1_deg": float(a1_deg),
    }
    if n * size * size <= 2**22:
        truth["noiseless"] = clean
    binned_nm = pixel_nm * imager.camera.binning
    return ImageStack(
        frames=frames,
        pixel_size_nm=(binned_nm, binned_nm),
        records=records,
        instrument={
            "optics": opt.model_dump(),
            "camera": imager.camera.model_dump(),
            "pixel_nm": binned_nm,
        },
        metadata={
            "simulator": "scherzer.simulators.hrtem",
            "specimen": specimen.name,
            "specimen_description": specimen.description,
            "coherence": imager.coherence,
            "margin_px": margin,
            "seed": seed,
            "step_error_fraction": step_error_fraction,
            "focal_drift_nm_per_frame": focal_drift_nm_per_frame,
        },
        ground_truth=truth,
        intensity_units="counts",
    )
