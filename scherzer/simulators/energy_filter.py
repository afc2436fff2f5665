"""Simulated imaging energy filter (EFTEM) with a core-loss specimen model and ground truth.

Units: energies eV, lengths nm, times s, areal densities atoms/nm², camera output ADU (counts).
Shifts follow ARCHITECTURE.md: ``shift_px = (dy, dx)`` is where the content sits relative to the
truth origin (frame(r) ≈ ref(r − s)).

Specimen (:class:`EFTEMSpecimen`): a support film of one phase (smooth thickness ripple) carrying
spherical particles of other phases. Each phase has atom densities per element, an inelastic
mean free path λ (nm), a background exponent r and a plasmon (Drude loss function). Projected
thickness t_p(r) per phase is analytic (films: sum of cosines; spheres: 2√(R² − ρ²)), so a
shifted frame is rendered exactly, and the element maps n_k = Σ_p t_p ρ_{p,k} (atoms/nm²) are
the ground truth.

Single-scattering distribution per incident electron per eV (τ_p = t_p/λ_p, τ = Σ τ_p):

* zero loss: e^{−τ} · Gaussian(E; FWHM ``ZLP_FWHM_EV``);
* plasmon: Σ_p τ_p e^{−τ} · Drude(E; E_p, Γ_p) (unit area; double plasmons are left out);
* valence/background: Σ_p τ_p · B0 (E_REF/E)^{r_p} · (1 − exp(−(E/E_ROLL)^4)) (the roll-off
  keeps the power law finite at low loss);
* edges: Σ_k n_k · h_k (E/E_k)^{−s_k} · step(E − E_k), a logistic rise of width ``width_ev``.
  h_k is fixed by the edge's jump ratio J_k: in a reference material (λ = ``REF_MFP_NM``,
  r = ``REF_EXPONENT``, ρ_k = ``reference_density_per_nm3``) post/pre at onset = J_k, i.e.
  h_k = (J_k − 1) · B0 (E_REF/E_k)^{REF_EXPONENT} / (REF_MFP_NM · ρ_k). Earlier edges' tails
  add to a later edge's background, as in real spectra.

Filtered image at energy offset E and slit width w: I(r) = I0 Σ_c m_c(r) ∫_{E−w/2}^{E+w/2} f_c,
with I0 = ``beam_e_per_px_s`` (vacuum electrons per pixel per second); the components c are
separable (maps m_c times spectra f_c), so the window integrals are 1-D quadratures. The image is
blurred by the chromatic disc of the slit (Gaussian σ = Cc·β·w/E0/4) and then exposed through
:class:`~scherzer.simulators.detector.CameraModel` (Poisson electrons, MTF/NTF, gain, readout
noise, offset, integer readout) together with a fixed-pattern dark current (electrons per pixel
per second, seeded per pixel, proportional to the exposure). A beam-blanked acquisition gives the
dark reference (offset + dark current of that exposure, with its own noise). Slit out: the whole
spectrum reaches the camera.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from scherzer.drivers.base import EnergyFilterLimits, LimitExceeded
from scherzer.simulators.detector import CameraModel
from scherzer.simulators.microscope import SimClock, VirtualMicroscope
from scherzer.stack import FrameRecord

__all__ = [
    "EDGES",
    "PHASES",
    "EFTEMSpecimen",
    "Edge",
    "FilterLimits",
    "FilterOptics",
    "Phase",
    "VirtualEnergyFilter",
    "filtered_image",
    "make_eftem_specimen",
    "window_integrals",
]

#: Background model constants: B0 per eV per unit τ at E_REF (≈1e-3/eV at 100 eV is typical of
#: light-element films), the low-loss roll-off energy and the reference material of jump ratios.
B0_PER_EV = 1e-3
E_REF_EV = 100.0
E_ROLL_EV = 30.0
REF_EXPONENT = 3.0
REF_MFP_NM = 120.0
ZLP_FWHM_EV = 1.0
#: Upper end of the spectrum reaching the camera when the slit is out.
E_MAX_EV = 3000.0
#: Quadrature step inside an energy window (the zero-loss peak needs ≲ σ/4).
QUAD_STEP_EV = 0.05
#: Sub-pixel samples per axis when a pixel's projected thickness is averaged (4: the sphere
#: edges alias < 1 % of their contrast; 2 is faster and rougher).
SUPERSAMPLE = 1


@dataclass(frozen=True)
class Edge:
    """A core-loss edge: onset, jump ratio in its reference material, post-edge decay."""

    label: str
    onset_ev: float
    jump_ratio: float
    exponent: float
    reference_density_per_nm3: float
    width_ev: float = 2.0


@dataclass(frozen=True)
class Phase:
    """A material: atoms per nm³ per element, inelastic mean free path, background, plasmon."""

    densities_per_nm3: dict[str, float]
    mean_free_path_nm: float
    background_exponent: float
    plasmon_ev: float
    plasmon_width_ev: float


EDGES: dict[str, Edge] = {
    "C": Edge("C K", 284.0, 6.0, 3.0, 100.0),
    "Ti": Edge("Ti L2,3", 456.0, 6.0, 2.5, 32.0),
    "O": Edge("O K", 532.0, 3.0, 2.8, 64.0),
    "Fe": Edge("Fe L2,3", 708.0, 4.0, 2.5, 40.0),
}

PHASES: dict[str, Phase] = {
    "C": Phase({"C": 100.0}, 150.0, 3.0, 24.0, 12.0),
    "TiO2": Phase({"Ti": 32.0, "O": 64.0}, 120.0, 3.4, 26.0, 10.0),
    "Fe2O3": Phase({"Fe": 40.0, "O": 60.0}, 110.0, 3.6, 25.0, 10.0),
}


@dataclass(frozen=True)
class FilterOptics:
    """Chromatic blur of a slit: disc Cc·β·w/E0, used as a Gaussian of σ = disc/4."""

    voltage_kv: float = 200.0
    cc_mm: float = 1.2
    collection_semiangle_mrad: float = 10.0

    def blur_sigma_nm(self, slit_width_ev: float) -> float:
        disc_nm = self.cc_mm * 1e6 * self.collection_semiangle_mrad * 1e-3 * slit_width_ev
        return disc_nm / (self.voltage_kv * 1e3) / 4.0


#: The simulated filter's limits are the device contract's.
FilterLimits = EnergyFilterLimits


@dataclass
class EFTEMSpecimen:
    """A film of ``film_phase`` (``film_thickness_nm``, relative ripple ``film_ripple``) with
    spheres ``particles`` = ((y_nm, x_nm, radius_nm, phase), …), imaged on ``shape_px`` pixels
    of ``pixel_nm``. Positions are relative to the field's top-left corner at zero shift."""

    shape_px: tuple[int, int]
    pixel_nm: float
    particles: tuple[tuple[float, float, float, str], ...]
    film_phase: str = "C"
    film_thickness_nm: float = 10.0
    film_ripple: float = 0.2
    seed: int = 0
    _waves: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = {p[3] for p in self.particles} - PHASES.keys() | (
            {self.film_phase} - PHASES.keys()
        )
        if unknown:
            raise ValueError(f"unknown phase(s) {sorted(unknown)}; known: {sorted(PHASES)}")
        rng = np.random.default_rng(self.seed)
        angles = rng.uniform(0, 2 * np.pi, 3)
        wavelengths = rng.uniform(15.0, 60.0, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        k = np.stack([np.sin(angles), np.cos(angles)], 1) * (2 * np.pi / wavelengths)[:, None]
        self._waves = np.concatenate([k, phases[:, None]], 1)  # (3, [ky, kx, phase])

    def phases(self) -> list[str]:
        return sorted({self.film_phase, *(p[3] for p in self.particles)})

    def elements(self) -> list[str]:
        return sorted({e for p in self.phases() for e in PHASES[p].densities_per_nm3})

    def thickness_nm(self, shift_px=(0.0, 0.0), margin_px: int = 0) -> dict[str, np.ndarray]:
        """Projected thickness (nm) per phase, averaged over each pixel (``SUPERSAMPLE``² points:
        the camera integrates over its pixels, and unaliased frames register without bias), on
        the pixel grid plus ``margin_px`` each side, content displaced by ``shift_px``; float64
        (ny + 2m, nx + 2m)."""
        ny, nx = self.shape_px
        n = SUPERSAMPLE
        sub = (np.arange(n) + 0.5) / n - 0.5
        y = (np.arange(-margin_px, ny + margin_px)[:, None] + sub).ravel() - shift_px[0]
        x = (np.arange(-margin_px, nx + margin_px)[:, None] + sub).ravel() - shift_px[1]
        yy, xx = y[:, None] * self.pixel_nm, x[None, :] * self.pixel_nm
        ripple = sum(np.cos(ky * yy + kx * xx + ph) for ky, kx, ph in self._waves) / 3.0
        out = {p: np.zeros((y.size, x.size)) for p in self.phases()}
        out[self.film_phase] += self.film_thickness_nm * (1.0 + self.film_ripple * ripple)
        for py, px, radius, phase in self.particles:
            rho2 = (yy - py) ** 2 + (xx - px) ** 2
            out[phase] += 2.0 * np.sqrt(np.maximum(radius**2 - rho2, 0.0))
        shape = (ny + 2 * margin_px, n, nx + 2 * margin_px, n)
        return {p: t.reshape(shape).mean(axis=(1, 3)) for p, t in out.items()}

    def element_maps(self, shift_px=(0.0, 0.0)) -> dict[str, np.ndarray]:
        """Ground truth: areal density (atoms/nm²) per element, float32, content at ``shift_px``."""
        t = self.thickness_nm(shift_px)
        maps = {e: np.zeros(self.shape_px) for e in self.elements()}
        for phase, tp in t.items():
            for element, rho in PHASES[phase].densities_per_nm3.items():
                maps[element] += tp * rho
        return {e: m.astype(np.float32) for e, m in maps.items()}


def make_eftem_specimen(
    shape_px: tuple[int, int] = (128, 128),
    pixel_nm: float = 0.5,
    *,
    n_particles: int = 12,
    particle_phases: tuple[str, ...] = ("TiO2", "Fe2O3"),
    radius_nm: tuple[float, float] = (4.0, 9.0),
    seed: int = 0,
    **film: float | str,
) -> EFTEMSpecimen:
    """Seeded non-overlapping spheres of alternating ``particle_phases`` on a carbon film;
    centres may lie up to one radius outside the field (drift brings them in)."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape_px, dtype=float) * pixel_nm
    placed: list[tuple[float, float, float, str]] = []
    for _ in range(200 * n_particles):
        if len(placed) == n_particles:
            break
        r = float(rng.uniform(*radius_nm))
        cy, cx = (float(rng.uniform(-0.5 * r, e + 0.5 * r)) for e in extent)
        if all(math.hypot(cy - q[0], cx - q[1]) > r + q[2] + 1.0 for q in placed):
            placed.append((cy, cx, r, particle_phases[len(placed) % len(particle_phases)]))
    return EFTEMSpecimen(tuple(shape_px), pixel_nm, tuple(placed), seed=seed, **film)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ spectra
def _drude(e: np.ndarray, ep: float, width: float) -> np.ndarray:
    """Drude loss function shape E Γ Ep² / ((E² − Ep²)² + (E Γ)²) for E > 0 (unnormalised)."""
    e = np.maximum(e, 0.0)
    return e * width * ep**2 / ((e**2 - ep**2) ** 2 + (e * width) ** 2)


@functools.lru_cache(maxsize=64)
def _drude_norm(ep: float, width: float) -> float:
    e = np.arange(0.0, E_MAX_EV, 0.01)
    return float(np.trapezoid(_drude(e, ep, width), e))


def _background(e: np.ndarray, exponent: float) -> np.ndarray:
    safe = np.maximum(e, 1e-3)
    return B0_PER_EV * (E_REF_EV / safe) ** exponent * -np.expm1(-((safe / E_ROLL_EV) ** 4))


def _edge(e: np.ndarray, edge: Edge) -> np.ndarray:
    height = (edge.jump_ratio - 1.0) * B0_PER_EV * (E_REF_EV / edge.onset_ev) ** REF_EXPONENT
    height /= REF_MFP_NM * edge.reference_density_per_nm3
    step = 0.5 * (1.0 + np.tanh(3.0 * (e - edge.onset_ev - 0.5 * edge.width_ev) / edge.width_ev))
    return height * (np.maximum(e, 1.0) / edge.onset_ev) ** -edge.exponent * step


def _components(
    specimen: EFTEMSpecimen, thickness: dict[str, np.ndarray]
) -> list[tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """(map, spectrum per eV) pairs of the single-scattering model (module docstring)."""
    tau = {p: t / PHASES[p].mean_free_path_nm for p, t in thickness.items()}
    zero = np.exp(-sum(tau.values()))
    sigma = ZLP_FWHM_EV / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    comps: list = [
        (zero, lambda e: np.exp(-0.5 * (e / sigma) ** 2) / (sigma * math.sqrt(2 * np.pi)))
    ]
    for p, tp in tau.items():
        ph = PHASES[p]
        norm = _drude_norm(ph.plasmon_ev, ph.plasmon_width_ev)
        comps.append(
            (tp * zero, lambda e, ph=ph, n=norm: _drude(e, ph.plasmon_ev, ph.plasmon_width_ev) / n)
        )
        comps.append((tp, lambda e, r=ph.background_exponent: _background(e, r)))
    elements = {e: np.zeros_like(zero) for e in specimen.elements()}
    for p, tp in thickness.items():
        for element, rho in PHASES[p].densities_per_nm3.items():
            elements[element] += tp * rho
    for element, n in elements.items():
        comps.append((n, lambda e, edge=EDGES[element]: _edge(e, edge)))
    return comps


def window_integrals(
    spectra: list[Callable[[np.ndarray], np.ndarray]], energy_ev: float, slit_width_ev: float | None
) -> np.ndarray:
    """∫ f_c over [E − w/2, E + w/2] for every spectrum (slit out: w = None, the whole range)."""
    lo, hi = (-10.0, E_MAX_EV) if slit_width_ev is None else (
        energy_ev - 0.5 * slit_width_ev, energy_ev + 0.5 * slit_width_ev)  # fmt: skip
    e = np.linspace(lo, hi, max(3, math.ceil((hi - lo) / QUAD_STEP_EV) + 1))
    return np.array([np.trapezoid(f(e), e) for f in spectra])


def filtered_image(
    specimen: EFTEMSpecimen,
    energy_ev: float,
    slit_width_ev: float | None,
    exposure_s: float,
    *,
    camera: CameraModel,
    rng: np.random.Generator,
    beam_e_per_px_s: float,
    dark_e_per_px_s: np.ndarray,
    shift_px=(0.0, 0.0),
    optics: FilterOptics = FilterOptics(),
    blanked: bool = False,
) -> tuple[np.ndarray, dict]:
    """One energy-filtered camera image (float32 integer-valued counts) and its truth.

    ``slit_width_ev`` None = slit out. ``dark_e_per_px_s``: the camera's dark-current map
    (electrons/px/s, shape ``specimen.shape_px``). ``blanked``: beam off (a dark reference).
    Truth: ``expected_counts`` (noiseless net counts g·λ, float32), ``expected_dark_counts``
    (offset + g·dark electrons), ``electrons_per_px_s`` (noiseless filtered signal rate).
    """
    if not (exposure_s > 0 and math.isfinite(exposure_s)):
        raise ValueError(f"exposure_s must be > 0 and finite; got {exposure_s}")
    sigma_px = optics.blur_sigma_nm(slit_width_ev or 0.0) / specimen.pixel_nm
    margin = math.ceil(4.0 * sigma_px) + 1
    thickness = specimen.thickness_nm(shift_px, margin)
    comps = _components(specimen, thickness)
    weights = window_integrals([f for _, f in comps], energy_ev, slit_width_ev)
    rate = sum(w * m for w, (m, _) in zip(weights, comps, strict=True)) * beam_e_per_px_s
    if sigma_px > 0:
        rate = ndimage.gaussian_filter(rate, sigma_px, mode="nearest")
    rate = rate[margin:-margin, margin:-margin]
    signal_e = np.zeros_like(rate) if blanked else rate * exposure_s
    electrons = signal_e + np.asarray(dark_e_per_px_s, dtype=np.float64) * exposure_s
    pixel_A2 = (specimen.pixel_nm * 10.0) ** 2
    counts = camera.expose(electrons.astype(np.float32), 1.0 / pixel_A2, specimen.pixel_nm, rng)
    g = camera.gain_counts_per_e
    truth = {
        "expected_counts": (g * signal_e).astype(np.float32),
        "expected_dark_counts": (camera.offset_counts + g * electrons - g * signal_e).astype(
            np.float32
        ),
        "electrons_per_px_s": rate.astype(np.float32),
        "blur_sigma_px": sigma_px,
    }
    return counts, truth


# ------------------------------------------------------------------------------ the device
class VirtualEnergyFilter:
    """A simulated imaging filter with its camera: slit in/out, slit width, energy offset.

    Structurally an ``EnergyFilter`` (slit_in/slit_out/is_slit_in, get/set_slit_width_ev,
    get/set_energy_offset_ev, wait_settled) plus :meth:`acquire` (the filtered camera).
    ``clock``/``displacement_nm``: share a VirtualMicroscope's (``microscope.clock`` and
    ``microscope.displacement_nm``, nm (y, x) at time t) so drift and stage act on EFTEM frames;
    default a private clock and no drift. ``energy_drift_ev_per_s``: slow drift of the true
    energy offset (real filters need re-centring). Settings outside ``limits`` raise
    :class:`~scherzer.drivers.base.LimitExceeded`.
    """

    name = "sim-energy-filter"

    def __init__(
        self,
        specimen: EFTEMSpecimen,
        *,
        camera: CameraModel | None = None,
        clock: SimClock | None = None,
        displacement_nm: Callable[[float], np.ndarray] | None = None,
        beam_e_per_px_s: float = 2e5,
        dark_e_per_px_s: float = 1.0,
        optics: FilterOptics | None = None,
        limits: FilterLimits | None = None,
        energy_drift_ev_per_s: float = 0.0,
        readout_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if beam_e_per_px_s <= 0 or dark_e_per_px_s < 0:
            raise ValueError("beam_e_per_px_s must be > 0 and dark_e_per_px_s >= 0")
        self.specimen = specimen
        self.camera = camera or CameraModel()
        self.clock = clock or SimClock()
        self._displacement = displacement_nm or (lambda t: np.zeros(2))
        self.beam_e_per_px_s = float(beam_e_per_px_s)
        self.optics = optics or FilterOptics()
        self.limits = limits or FilterLimits()
        self.energy_drift_ev_per_s = float(energy_drift_ev_per_s)
        self.readout_s = float(readout_s)
        seeds = np.random.SeedSequence(seed).spawn(2)
        dark_rng = np.random.default_rng(seeds[0])
        # fixed-pattern dark current: gamma-distributed per pixel (mean dark_e_per_px_s, 30 % rms)
        self.dark_e_per_px_s = dark_rng.gamma(11.1, dark_e_per_px_s / 11.1, specimen.shape_px)
        self._rng = np.random.default_rng(seeds[1])
        self._lock = threading.RLock()
        self._slit_in = True
        self._width_ev = 20.0
        self._offset_ev = 0.0
        self._offset_set_s = self.clock.now_s()
        self._index = 0
        self.reset_truth()

    @classmethod
    def on_microscope(
        cls, microscope: VirtualMicroscope, specimen: EFTEMSpecimen, **kwargs
    ) -> VirtualEnergyFilter:
        """A filter on ``microscope``: its clock, its drift + stage displacement and its camera
        model (or the detector defaults) act on every EFTEM frame; ``seed`` defaults to the
        microscope's. Other keywords as for the constructor."""
        kwargs.setdefault("seed", microscope.seed)
        return cls(
            specimen,
            camera=microscope.camera,
            clock=microscope.clock,
            displacement_nm=microscope.displacement_nm,
            readout_s=microscope.readout_s,
            **kwargs,
        )

    def reset_truth(self) -> None:
        """Shifts in truth are measured from the content position now."""
        with self._lock:
            self._truth_ref_nm = np.asarray(self._displacement(self.clock.now_s()), dtype=float)

    # ------------------------------------------------------------ EnergyFilter protocol
    def slit_in(self) -> None:
        with self._lock:
            self._slit_in = True

    def slit_out(self) -> None:
        with self._lock:
            self._slit_in = False

    def is_slit_in(self) -> bool:
        with self._lock:
            return self._slit_in

    def get_slit_width_ev(self) -> float:
        with self._lock:
            return self._width_ev

    def set_slit_width_ev(self, width_ev: float) -> None:
        self._check("slit_width_ev", width_ev)
        with self._lock:
            self._width_ev = float(width_ev)

    def get_energy_offset_ev(self) -> float:
        """The set energy offset (the read-back does not see the simulated energy drift)."""
        with self._lock:
            return self._offset_ev

    def set_energy_offset_ev(self, offset_ev: float) -> None:
        self._check("energy_offset_ev", offset_ev)
        with self._lock:
            self._offset_ev = float(offset_ev)
            self._offset_set_s = self.clock.now_s()

    def wait_settled(self, timeout_s: float = 5.0) -> None:
        """Settings act at once in the simulator."""

    def _check(self, name: str, value: float) -> None:
        lo, hi = getattr(self.limits, name)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise LimitExceeded(
                f"{name} {value} outside the filter's limits [{lo}, {hi}]; nothing was changed",
                device=self.name,
                details={"setting": name, "value": value, "limits": [lo, hi]},
            )

    # ------------------------------------------------------------ acquisition
    def true_energy_ev(self, t_s: float) -> float:
        with self._lock:
            return self._offset_ev + self.energy_drift_ev_per_s * (t_s - self._offset_set_s)

    def acquire(
        self, exposure_s: float, *, blanked: bool = False
    ) -> tuple[np.ndarray, FrameRecord, dict]:
        """Expose the camera through the filter (``blanked``: beam off, a dark reference).

        Returns (float32 integer-valued counts, record, truth). The clock advances by the
        exposure plus ``readout_s``; the frame is rendered at the content displacement of
        mid-exposure. Truth adds to :func:`filtered_image`'s: ``shift_px`` (relative to the truth
        origin), ``energy_ev`` (true), ``slit_width_ev`` (None when out), ``t_mid_s``,
        ``element_maps`` (atoms/nm² at this frame's content position), ``blanked``.
        """
        with self._lock:
            t0 = self.clock.now_s()
            t_mid = t0 + 0.5 * exposure_s
            shift = (np.asarray(self._displacement(t_mid), float) - self._truth_ref_nm) / (
                self.specimen.pixel_nm
            )
            energy = self.true_energy_ev(t_mid)
            width = self._width_ev if self._slit_in else None
            image, truth = filtered_image(
                self.specimen, energy, width, exposure_s, camera=self.camera, rng=self._rng,
                beam_e_per_px_s=self.beam_e_per_px_s, dark_e_per_px_s=self.dark_e_per_px_s,
                shift_px=(float(shift[0]), float(shift[1])), optics=self.optics, blanked=blanked,
            )  # fmt: skip
            pixel_A2 = (self.specimen.pixel_nm * 10.0) ** 2
            record = FrameRecord(
                index=self._index,
                time_s=t0,
                exposure_s=float(exposure_s),
                dose_e_per_A2=0.0 if blanked else self.beam_e_per_px_s * exposure_s / pixel_A2,
                voltage_kv=self.optics.voltage_kv,
                signal="dark" if blanked else "eftem",
            )
            self._index += 1
            self.clock.advance(exposure_s + self.readout_s)
            truth.update(
                shift_px=shift, energy_ev=energy, slit_width_ev=width, t_mid_s=t_mid,
                blanked=blanked, element_maps=self.specimen.element_maps(tuple(shift)),
            )  # fmt: skip
            return image, record, truth

    def expected_rate(self, energy_ev: float, slit_width_ev: float | None) -> np.ndarray:
        """Noiseless filtered signal (electrons/px/s) at zero shift (ground truth)."""
        cam = CameraModel(mtf_model="none", readout_noise_counts=0.0, offset_counts=0.0)
        _, truth = filtered_image(
            self.specimen, energy_ev, slit_width_ev, 1.0, camera=cam, rng=np.random.default_rng(0),
            beam_e_per_px_s=self.beam_e_per_px_s, dark_e_per_px_s=np.zeros(self.specimen.shape_px),
            optics=self.optics,
        )  # fmt: skip
        return truth["electrons_per_px_s"]
