"""The per-frequency 2×2 Wiener solve of a focal series on a band.

One job: restore φ (ψ = 1 + φ) on a :class:`~scherzer.processing.spectral.SpectralBand` from
aligned image spectra and wave transfers — the normal equations per image
(:class:`NormalTerms`), the 2×2 solve per frequency (:func:`solve_pair`) with a radial Wiener
prior estimated from the data (:func:`solve_wiener`), the noise per image
(:func:`noise_variances`), the quadratic term the linear model leaves out
(:func:`quadratic_term`) and the whole series solve with leave-one-out waves
(:func:`solve_series`). Shared by focal-series registration (predicting each image from the
others) and exit-wave restoration.

Conventions: the linear two-sided imaging model of :mod:`scherzer.processing.spectral`,
I_n(g) = C(g) [φ(g) T_n(g) + φ*(−g) T_n*(−g)] + noise; spectra unnormalised FFTs of
mean-normalised frames minus 1; noise weights 1/(σ_n² NPS(g)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft as sfft

from scherzer.optics import fft_workers
from scherzer.processing.spectral import SpectralBand

PRIOR_NOISE_FLOOR = 0.05  # registration's Wiener prior ≥ this × the noise variance: keeps some of
# every frequency in the waves that predict images (the restoration uses its own, lower floor)

__all__ = [
    "NormalTerms",
    "SeriesSolution",
    "linear_prediction",
    "noise_variances",
    "pair_noise_covariance",
    "quadratic_term",
    "radial_power_prior",
    "solve_pair",
    "solve_series",
    "solve_wiener",
]


# --------------------------------------------------------------------------------------------
# the 2×2 Wiener solve
# --------------------------------------------------------------------------------------------
@dataclass
class NormalTerms:
    """The 2×2 normal equations of a series: their sums over images (each (m,)) of
    aa = w|a|², ab = w a* b, bb = w|b|², ra = w a* S, rb = w b* S, and the per-image inputs
    (spectra, a, b, w, each (n, m)) from which a leave-one-out solve subtracts image n's own
    terms (:meth:`solve_leave_one_out`). The per-image terms are never stored: the sums are
    accumulated in one fused pass (:func:`_normal_sums`), in numpy's order."""

    aa: np.ndarray
    ab: np.ndarray
    bb: np.ndarray
    ra: np.ndarray
    rb: np.ndarray
    inputs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def build(cls, spectra: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray):
        """The sums of (n, m) ``spectra`` with coefficients ``a``, ``b`` and weights ``w``
        (broadcast to (n, m))."""
        shape = np.broadcast_shapes(spectra.shape, a.shape, b.shape, np.shape(w))
        args = tuple(
            np.ascontiguousarray(np.broadcast_to(x, shape), dt)
            for x, dt in ((spectra, np.complex64), (a, np.complex64), (b, np.complex64),
                          (w, np.float32))
        )  # fmt: skip
        m = shape[-1]
        aa, bb = np.zeros(m, np.float32), np.zeros(m, np.float32)
        ab, ra, rb = (np.zeros(m, np.complex64) for _ in range(3))
        flat = tuple(x.reshape(-1, m) for x in args)
        _normal_sums(*flat, aa, ab, bb, ra, rb)
        return cls(aa=aa, ab=ab, bb=bb, ra=ra, rb=rb, inputs=flat)

    def sums(self) -> tuple[np.ndarray, ...]:
        """The sums over images (aa, ab, bb, ra, rb)."""
        return (self.aa, self.ab, self.bb, self.ra, self.rb)

    def solve_leave_one_out(self, reg: np.ndarray | float) -> np.ndarray:
        """φ (n, m): for every image, :func:`solve_pair` of the sums without its own terms
        (regulariser ``reg``, (m,) or scalar), in one fused pass (:func:`_loo_solve`)."""
        spectra = self.inputs[0]
        reg32 = np.ascontiguousarray(np.broadcast_to(reg, spectra.shape[-1:]), np.float32)
        phi = np.empty(spectra.shape, np.complex64)
        _loo_solve(*self.inputs, *self.sums(), reg32, phi)
        return phi


@numba.njit(cache=True, nogil=True)
def _normal_sums(spectra, a, b, w, aa, ab, bb, ra, rb):  # pragma: no cover - numba
    """Adds, image by image (as numpy's sum over axis 0), aa += w|a|², ab += w a* b,
    bb += w|b|², ra += w a* S, rb += w b* S ((n, m) inputs, (m,) zeroed outputs; float32 and
    complex64 arithmetic in numpy's order: (w a*) first, then the product)."""
    for i in range(spectra.shape[0]):
        for j in range(spectra.shape[1]):
            wj, aj, bj, sj = w[i, j], a[i, j], b[i, j], spectra[i, j]
            aa[j] += wj * (aj.real * aj.real + aj.imag * aj.imag)
            bb[j] += wj * (bj.real * bj.real + bj.imag * bj.imag)
            wca = np.complex64(complex(wj * aj.real, wj * -aj.imag))
            wcb = np.complex64(complex(wj * bj.real, wj * -bj.imag))
            ab[j] += wca * bj
            ra[j] += wca * sj
            rb[j] += wcb * sj


@numba.njit(cache=True, nogil=True)
def _loo_solve(spectra, a, b, w, aa, ab, bb, ra, rb, reg, phi):  # pragma: no cover - numba
    """phi[i] = solve_pair of the sums minus image i's terms, as :func:`solve_pair` rounds it
    (numpy divides a complex64 by a real det as × (1/det))."""
    one, tiny = np.float32(1.0), np.float32(1e-30)
    for i in range(spectra.shape[0]):
        for j in range(spectra.shape[1]):
            wj, aj, bj, sj = w[i, j], a[i, j], b[i, j], spectra[i, j]
            wca = np.complex64(complex(wj * aj.real, wj * -aj.imag))
            wcb = np.complex64(complex(wj * bj.real, wj * -bj.imag))
            laa = aa[j] - wj * (aj.real * aj.real + aj.imag * aj.imag)
            lbb = bb[j] - wj * (bj.real * bj.real + bj.imag * bj.imag)
            lab = ab[j] - wca * bj
            lra = ra[j] - wca * sj
            lrb = rb[j] - wcb * sj
            a11 = laa + reg[j]
            a22 = lbb + reg[j]
            det = max(a11 * a22 - (lab.real * lab.real + lab.imag * lab.imag), tiny)
            num = np.complex64(complex(a22 * lra.real, a22 * lra.imag)) - lab * lrb
            scl = one / det
            phi[i, j] = np.complex64(complex(num.real * scl, num.imag * scl))


def solve_pair(aa, ab, bb, ra, rb, reg) -> tuple[np.ndarray, np.ndarray]:
    """x = (φ(g), A⁻¹₁₁) from [[aa+reg, ab], [ab*, bb+reg]] x = [ra, rb]."""
    a11 = aa + reg
    a22 = bb + reg
    det = a11 * a22 - (ab.real**2 + ab.imag**2)
    det = np.maximum(det, 1e-30)
    phi = (a22 * ra - ab * rb) / det
    return phi.astype(np.complex64, copy=False), (a22 / det).astype(np.float32, copy=False)


def pair_noise_covariance(terms_sums: tuple[np.ndarray, ...], reg: np.ndarray) -> np.ndarray:
    """E[n₁ n₂*] of the solved pair (φ(g), φ*(−g)) for noise-normalised weights (w = 1/σ²).

    cov = (A + R)⁻¹ A (A + R)⁻¹ with A the normal matrix; returns its (1, 2) element (m,).
    Needed to de-bias products φ(g)φ(−g) = x₁ x₂* of noisy restorations.
    """
    aa, ab, bb = (np.asarray(x, np.complex128) for x in terms_sums[:3])
    r = np.asarray(reg, np.float64)
    m11, m22 = bb + r, aa + r
    det = (aa + r) * (bb + r) - np.abs(ab) ** 2
    m12 = -ab
    # M = adj/det with adj = [[m11, m12], [m12*, m22]]; cov12 = (M A M)_12
    a_m_12 = aa * m12 + ab * m22
    a_m_22 = np.conj(ab) * m12 + bb * m22
    cov12 = (m11 * a_m_12 + m12 * a_m_22) / det**2
    return cov12.astype(np.complex64)


def _prior_bins(band: SpectralBand, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin of every band element by |g| in ``n_bins`` equal bins, elements per bin), once
    per band (:meth:`SpectralBand.memo`)."""

    def make() -> tuple[np.ndarray, np.ndarray]:
        q = np.hypot(band.gy, band.gx)
        edges = np.linspace(0.0, q.max() + 1e-9, n_bins + 1)
        which = np.clip(np.digitize(q, edges) - 1, 0, n_bins - 1)
        return which, np.bincount(which, minlength=n_bins).astype(np.float64)

    return band.memo(("prior_bins", n_bins), make)


def radial_power_prior(
    band: SpectralBand,
    phi: np.ndarray,
    noise_var: np.ndarray,
    n_bins: int = 48,
    floor: float = PRIOR_NOISE_FLOOR,
) -> np.ndarray:
    """Wiener prior power S(g) per band element: radial mean of |φ|² minus its noise variance,
    at least ``floor`` × the noise variance (and 1e-12)."""
    which, count = _prior_bins(band, n_bins)
    power = np.bincount(which, weights=np.abs(phi) ** 2 - noise_var, minlength=n_bins)
    noise = np.bincount(which, weights=noise_var, minlength=n_bins)
    count = np.maximum(count, 1)
    s = power / count
    s = np.maximum(s, np.maximum(floor * noise / count, 1e-12))
    return s[which].astype(np.float32)


def solve_wiener(
    terms: NormalTerms,
    band: SpectralBand,
    drop: np.ndarray | None = None,
    passes: int = 2,
    prior_scale: float = 1.0,
    prior_floor: float = PRIOR_NOISE_FLOOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Wiener estimate of φ on the band (and the prior used).

    First a nearly unregularised solve, then ``passes − 1`` solves with the radial prior
    S(g) estimated from the previous one (times ``prior_scale``: > 1 regularises less). With
    ``drop`` the result is (n, m): image n's leave-one-out estimate from the others, with the
    prior of the full solve.
    """
    aa, ab, bb, ra, rb = terms.sums()
    reg = np.float32(1e-4) * float(np.median(aa + bb)) + np.float32(1e-20)
    phi, var = solve_pair(aa, ab, bb, ra, rb, reg)
    prior = None
    for _ in range(passes - 1):
        prior = radial_power_prior(band, phi, var, floor=prior_floor) * np.float32(prior_scale)
        phi, var = solve_pair(aa, ab, bb, ra, rb, 1.0 / prior)
    if drop is None:
        return phi, (prior if prior is not None else np.full(band.size, 1 / reg, np.float32))
    reg_loo = 1.0 / prior if prior is not None else reg
    return terms.solve_leave_one_out(reg_loo), prior


def linear_prediction(phi: np.ndarray, a: np.ndarray, b: np.ndarray, band: SpectralBand):
    """Image spectra φ(g) a(g) + φ*(−g) b(g) on the band (broadcasting over leading axes)."""
    return phi * a + band.conj_neg(phi) * b


def quadratic_term(
    band: SpectralBand,
    phi: np.ndarray,
    t: np.ndarray,
    camera: np.ndarray | float = 1.0,
    weights: list[tuple[float, np.ndarray]] | None = None,
) -> np.ndarray:
    """C(g)·F[|F⁻¹[φ T_n]|²] on the band, (n, m): the term the linear model leaves out.

    Computed on the band's alias-free product box (fewer pixels than the image), scaled to
    the full grid's unnormalised FFT convention; the power is real, so its spectrum is an
    rfft2 half read back through conjugate symmetry. With ``weights`` [(w_j, T_j (n, m))]
    (``t`` unused) the weighted sum Σ w_j C·F[|F⁻¹[φ T_j]|²]: the powers are summed in the
    box, so the forward transform and the gather run once.
    """
    (by, bx), pos = band.product_box
    half_pos, conj = band.product_box_half
    pairs = [(1.0, t)] if weights is None else weights
    n, m = pairs[0][1].shape[0], band.size
    full_px, box_px = band.shape[0] * band.shape[1], by * bx
    phi = np.ascontiguousarray(phi, np.complex64)
    power = np.zeros((n, by, bx), np.float32)
    for w, tj in pairs:
        grid = np.zeros((n, by, bx), np.complex64)
        _scatter_product(
            phi, np.ascontiguousarray(tj, np.complex64), np.float32(box_px / full_px), pos,
            grid.reshape(n, -1),
        )  # fmt: skip
        img = sfft.ifft2(grid, workers=fft_workers(), overwrite_x=True)
        _add_abs2(img.reshape(-1), np.float32(w), power.reshape(-1))
    half = sfft.rfft2(power, workers=fft_workers()).reshape(n, -1)
    cam = np.ascontiguousarray(np.broadcast_to(np.asarray(camera, np.float32), (m,)))
    spec = np.empty((n, m), np.complex64)
    _gather_half(half, half_pos, conj, np.float32(full_px / box_px), cam, spec)
    return spec


@numba.njit(cache=True, nogil=True)
def _add_abs2(x, w, out):  # pragma: no cover - numba
    """out += w |x|² (flat complex64 x, float32 out; |x|² as numpy rounds it, then × w)."""
    one = w == np.float32(1.0)
    for j in range(x.shape[0]):
        p = x[j].real * x[j].real + x[j].imag * x[j].imag
        out[j] += p if one else w * p


@numba.njit(cache=True, nogil=True)
def _scatter_product(phi, t, scale, pos, grid):  # pragma: no cover - numba
    """grid[i, pos[j]] = φ[j] t[i, j] · scale (complex64; the rest of ``grid`` untouched)."""
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            v = phi[j] * t[i, j]
            grid[i, pos[j]] = np.complex64(complex(v.real * scale, v.imag * scale))


@numba.njit(cache=True, nogil=True)
def _gather_half(half, half_pos, conj, scale, camera, out):  # pragma: no cover - numba
    """out[i, j] = half[i, half_pos[j]] (conjugated where ``conj``) · scale · camera[j]."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = half[i, half_pos[j]]
            im = -v.imag if conj[j] else v.imag
            c = camera[j]
            out[i, j] = np.complex64(complex((v.real * scale) * c, (im * scale) * c))


@dataclass
class SeriesSolution:
    """The Wiener solution of a series on a band (see :func:`solve_series`)."""

    phi: np.ndarray
    prior: np.ndarray
    sigma2: np.ndarray
    terms: NormalTerms
    quadratic: np.ndarray
    loo: np.ndarray | None


def solve_series(
    spectra: np.ndarray,
    t: np.ndarray,
    band: SpectralBand,
    *,
    camera: np.ndarray | float = 1.0,
    nps_band: np.ndarray | None = None,
    dose_weights: np.ndarray | None = None,
    corrections: int = 1,
    leave_one_out: bool = False,
    prior_scale: float = 1.0,
    mask: np.ndarray | None = None,
    prior_floor: float = PRIOR_NOISE_FLOOR,
    quadratic_transfers: list[tuple[float, np.ndarray]] | None = None,
) -> SeriesSolution:
    """Wiener-restore φ from aligned band spectra (n, m) and wave transfers ``t`` (n, m).

    Noise per image is measured from the residual of a first solve (or from ``dose_weights``);
    ``corrections`` rounds subtract the quadratic term |φ_img|² predicted by the current wave
    from the data before solving again (strong objects). With ``leave_one_out`` also returns,
    for every image, φ restored from all the others (same prior and quadratic terms).
    ``prior_scale`` multiplies the Wiener prior power (see :func:`solve_wiener`): registration
    uses a weak prior, because shrinking the pair (φ(g), φ*(−g)) towards the direction the
    other images determine best distorts the predicted image and biases its fitted defocus
    (measured: 0.44 → 0.05 nm RMS of per-image defocus from a leave-one-out wave at 100 e/Å²).
    ``mask`` (n, m) bool: frequencies each image contributes (others get zero weight).
    ``prior_floor``: the prior power is at least this × the noise variance (see
    :data:`PRIOR_NOISE_FLOOR`). ``quadratic_transfers``: [(weight, transfer (n, m))] whose
    weighted sum of quadratic terms replaces the one of ``t`` (an incoherent focal-spread
    average, see :func:`scherzer.processing.restoration.focal_spread_nodes`).
    """
    n = spectra.shape[0]
    spectra = np.ascontiguousarray(spectra, np.complex64)  # once, not in every pass below
    nps_b = np.ones(1, np.float32) if nps_band is None else nps_band
    # the coefficients as complex64 once (a float64 camera or transfer would otherwise be cast
    # in every pass)
    a = np.asarray(t * camera).astype(np.complex64, copy=False)
    b = np.asarray(band.conj_neg(t) * camera).astype(np.complex64, copy=False)
    q = np.zeros_like(spectra)
    m = np.ones((n, 1), np.float32) if mask is None else mask.astype(np.float32)
    w = (np.broadcast_to(1.0 / nps_b, (n, nps_b.shape[-1])) * m).astype(np.float32, copy=False)
    phi, _ = solve_wiener(NormalTerms.build(spectra, a, b, w), band, passes=1)
    for k in range(corrections + 1):
        data = spectra - q if k else spectra
        sigma2 = _series_noise(data, a, b, phi, band, nps_b, dose_weights, mask)
        w = (m / sigma2[:, None] / nps_b).astype(np.float32, copy=False)
        terms = NormalTerms.build(data, a, b, w)
        phi, prior = solve_wiener(terms, band, None, 2, prior_scale, prior_floor)
        if k < corrections:
            q = _quadratic(band, phi, t, camera, quadratic_transfers)
    loo = None
    if leave_one_out:
        loo, _ = solve_wiener(terms, band, np.ones(n, bool), 2, prior_scale, prior_floor)
    return SeriesSolution(phi, prior, sigma2, terms, q, loo)


def _quadratic(band, phi, t, camera, transfers) -> np.ndarray:
    """The quadratic term of ``t``, or the weighted sum over ``transfers`` (see
    :func:`solve_series`)."""
    # node by node into one power sum (one batch of all nodes was no faster and varied more:
    # measured 20 × 512², 5 nodes, 0.40–0.82 s CPU batched, 0.41–0.46 s node by node)
    return quadratic_term(band, phi, t, camera, transfers)


def _series_noise(data, a, b, phi, band, nps_band, dose_weights, mask) -> np.ndarray:
    """:func:`noise_variances` of the residual data − φ a − φ*(−g) b (each (n, m)), accumulated
    per image in one fused pass (:func:`_residual_power`; no (n, m) residual)."""
    data, a, b = (np.ascontiguousarray(x, np.complex64) for x in (data, a, b))
    n, m = data.shape
    inv_nps = np.ascontiguousarray(np.broadcast_to(1.0 / nps_band, (m,)), np.float32)
    weight = np.ones((1, 1), np.float32) if mask is None else np.asarray(mask, np.float32)
    phi = np.ascontiguousarray(phi, np.complex64)
    total = np.zeros(n)
    _residual_power(data, phi, band.conj_neg(phi), a, b, inv_nps, weight, total)
    used = np.full(n, float(m)) if mask is None else np.maximum(weight.sum(axis=1), 1)
    return _noise_from_power(total / used, n, dose_weights)


@numba.njit(cache=True, nogil=True)
def _residual_power(data, phi, phi_negc, a, b, inv_nps, weight, out):  # pragma: no cover
    """out[i] += Σ_j weight[i, j] |data[i, j] − φ[j] a[i, j] − φ*(−g)[j] b[i, j]|² / NPS[j]
    (float64 sums; ``weight`` (n, m), or (1, 1) for all ones)."""
    full = weight.shape[1] == 1
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            r = data[i, j] - (phi[j] * a[i, j] + phi_negc[j] * b[i, j])
            p = (r.real * r.real + r.imag * r.imag) * inv_nps[j]
            out[i] += p if full else p * weight[i, j]


def _noise_from_power(mean_power, n_used, dose_weights) -> np.ndarray:
    """σ_n² from the mean residual power per image (see :func:`noise_variances`)."""
    dof = max(1.0 - 2.0 / max(n_used, 3), 0.2)
    p = mean_power / dof
    if dose_weights is not None:
        d = np.asarray(dose_weights, dtype=np.float64)
        common = float(np.mean(p * d))
        p = common / d
    return np.maximum(p, 1e-30)


def noise_variances(
    resid: np.ndarray,
    nps_band: np.ndarray,
    n_used: int,
    dose_weights: np.ndarray | None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """σ_n² per image from residual power (corrected for the 2 fitted unknowns per pair);
    with ``mask`` (n, m) only the frequencies an image contributes are averaged."""
    power = np.abs(resid) ** 2 / nps_band
    if mask is None:
        p = power.mean(axis=1)
    else:
        p = (power * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    return _noise_from_power(p, n_used, dose_weights)
