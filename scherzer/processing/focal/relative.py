"""Relative defocus and drift of a series with amorphous material (the default strategy).

One job: the passes that register every image of an amorphous (or amorphous + crystal) field
— the first pass outward from the reference (:func:`first_pass`: the nearest neighbours
matched to the reference through the weak-phase transfer, :func:`match_reference`; further
images against their prediction from the images registered so far, :func:`match_wave`) and
the later leave-one-out passes (:func:`wave_pass`) — and :class:`AmorphousStrategy`, which
strings them together for :func:`~scherzer.processing.focal.register.register_focal_series`.

Conventions: defocus in nm (C1 < 0 underfocus), shifts in px with frame_i(r) ≈ ref(r − s_i);
the reference's shift is 0 after every pass (it defines the frame).
"""

from __future__ import annotations

import numpy as np

from scherzer.processing.focal.absolute import ChiFit, fit_chi_weak_phase, wave_absolute
from scherzer.processing.focal.kernels import over_chunks, wave_correlation
from scherzer.processing.focal.problem import (
    PassState,
    Problem,
    clip_spots,
    clip_weight,
    loo_waves,
    map_images,
    refine_shifts,
    whiten,
)
from scherzer.processing.focal.search import search_defocus_shift, search_defocus_shift_local
from scherzer.processing.focal.settings import MIN_IMAGES
from scherzer.processing.spectral import shift_phase
from scherzer.processing.wiener import quadratic_term, solve_series

__all__ = [
    "AmorphousStrategy",
    "first_pass",
    "match_image",
    "match_reference",
    "match_wave",
    "reference_by_peak",
    "wave_pass",
]

FINE_RANGE_NM = 3.0  # ± defocus search of the passes after the first wide one (wider: slower,
# and a far side maximum can win; narrower: a poor start is not recovered)
TRUST_SETTLED_NM = 0.5  # a pass whose largest defocus change was below this has settled: the
# next pass searches each defocus within ± TRUST_HALF_NM of it first (no coarse trials), the
# full range only where the maximum lies at that region's edge. Measured over 9 series (abTEM,
# synthetic, simulator 256²–512²): mean relative RMS 0.1973 → 0.1979 nm (path noise), 15–25 %
# less time per settled pass; a region ± 2× the last change (≥ 0.2 nm) gave 0.1995 nm
TRUST_HALF_NM = 0.5
WAVE_SHIFT_WINDOW_PX = 3.0  # the first wave pass searches shifts within this of the last
PAIR_NOISE_FLOOR = 0.05  # match_reference: noise floor of s_r² + s_n², × the mean s_r²
FIRST_PASS_WAVE_IMAGES = 8  # first pass: each image is predicted from the wave of at most this
# many images done, the nearest in defocus
WAVE_CORRECTIONS = 1  # quadratic-term rounds of the waves fitted to find the absolute defocus


def match_reference(prob: Problem, i: int, ref: int, d_abs, env_s, center, rng_nm, window):
    """Image i against the reference alone through the weak-phase transfer s = 2 sin χ · E:
    :func:`pair_match`, once per set of inputs (the choice of the reference and the first pass
    ask for the same pairs)."""
    key = ("pair", i, ref, float(d_abs[ref]), float(center), float(rng_nm),
           tuple(np.asarray(window[0], float).tolist()), float(window[1]), prob.optics_version,
           hash(env_s[i].tobytes()), hash(env_s[ref].tobytes()))  # fmt: skip
    return prob.memo(key, lambda: pair_match(prob, i, ref, d_abs, env_s, center, rng_nm, window))


def pair_match(prob: Problem, i: int, ref: int, d_abs, env_s, center, rng_nm, window):
    """Image i against the reference alone through the weak-phase transfer s = 2 sin χ · E.

    For a weak-phase object S_n s_r − S_r s_n is pure noise of variance ∝ s_r² + s_n², so the
    pair's likelihood is maximal where L = E − 2C is least, with C = Re Σ S_n S_r* s_r s_n
    e^{2πig·s} / (s_r² + s_n²) and E = Σ (|S_n|² s_r² + |S_r|² s_n²) / (s_r² + s_n²). (The ratio
    C/(E/2) would favour Δ → 0, where the pair is simply two similar images.) The reported peak
    is C/(E/2) ≤ 1, 1 for noise-free, consistent images.
    """
    p = prob.params
    s_r = prob.ctf(np.array([d_abs[ref]]), env_s[ref])[0] * prob.mask[ref]
    xi = clip_spots(whiten(prob.spectra[i], p.whiten_first), prob.band, p.clip_spots)
    xr = clip_spots(whiten(prob.spectra[ref], p.whiten_first), prob.band, p.clip_spots)
    base = xi * np.conj(xr) * s_r
    pow_i, pow_r = np.abs(xi) ** 2, np.abs(xr) ** 2
    eps = np.float32(PAIR_NOISE_FLOOR * np.mean(s_r * s_r))

    e0 = 0.25 * float((pow_i + pow_r).sum())  # a fixed scale: the search maximises C − E/2

    def energy(sn):
        den = s_r[None] ** 2 + sn * sn + eps
        return 0.5 * ((pow_i[None] * s_r[None] ** 2 + pow_r[None] * sn * sn) / den).sum(axis=1)

    def z_of(trials):
        sn = prob.ctf(trials, env_s[i]) * prob.mask[i]
        den = s_r[None] ** 2 + sn * sn + eps
        return (
            (base[None] * sn / den).astype(np.complex64, copy=False),
            np.full(len(trials), e0),
            energy(sn),
        )

    delta, s, _ = search_defocus_shift(
        prob.corr, z_of, center, rng_nm, p.coarse_trials, p.tolerance_nm, None, window
    )
    z, _, half_e = z_of(np.array([delta]))
    peak = prob.corr.refine(z[0], s, float(half_e[0]), 0)[1]  # C / (E/2), reported
    return delta, s, peak


def match_wave(
    prob: Problem, i, phi, quad_i, env_s_i, center, rng_nm, shift_guess, window=None, local=0.0
):
    """Image i against its prediction φ T + φ*(−g) T*(−g) + quadratic term, over Δ and shift.

    Δ and shift are searched on spectra whitened by ``FocalParams.whiten``; the shift is then
    refined at that Δ with ``whiten_shift`` (see :class:`FocalParams`). ``local`` > 0 (nm, with
    ``shift_guess``): search only within ± that of ``center`` first
    (:func:`~.search.search_defocus_shift_local`), the full range if the maximum is at its
    edge."""
    p = prob.params
    phi = np.ascontiguousarray(phi, np.complex64)
    phi_neg = prob.band.conj_neg(phi)
    quad_i = np.ascontiguousarray(quad_i, np.complex64)
    amp = prob.bt.amplitude(env_s_i)  # one envelope for every trial defocus

    def weighted(exponent: float, clip: float):  # depends on image i alone: once per problem
        w = clip_weight(prob.spectra[i], prob.band, clip)
        spec_w = whiten(prob.spectra[i] * w, exponent)
        mw = (prob.mask[i] * w).astype(np.float32, copy=False)
        return spec_w, float(np.linalg.norm(spec_w)), mw

    def z_maker(exponent: float, clip: float = 0.0):
        spec_w, spec_norm, mw = prob.memo(
            ("weighted", i, exponent, clip), lambda: weighted(exponent, clip)
        )

        def z_of(trials):  # one fused pass per trial (kernels.wave_correlation)
            x = prob.bt.chi(trials).astype(np.float32)
            z = np.empty(x.shape, np.complex64)
            args = (phi, phi_neg, amp, np.cos(x), np.sin(x), prob.band.neg32, prob.camera,
                    quad_i, mw, spec_w, float(exponent), z)  # fmt: skip
            parts = over_chunks(lambda j0, j1: wave_correlation(*args, j0, j1), prob.corr.chunks)
            return z, spec_norm * np.sqrt(np.sum(parts, axis=0))

        return z_of

    search_z = z_maker(p.whiten, p.clip_spots_wave)
    found = None
    if local > 0 and shift_guess is not None:
        found = search_defocus_shift_local(
            prob.corr, search_z, center, local, p.tolerance_nm, shift_guess
        )
    if found is None:
        found = search_defocus_shift(
            prob.corr, search_z, center, rng_nm, p.coarse_trials, p.tolerance_nm, shift_guess,
            window,
        )  # fmt: skip
    delta, s, peak = found
    if p.whiten_shift != p.whiten or p.clip_spots_wave:  # shift and peak on the plain spectra
        z, norm = z_maker(p.whiten_shift)(np.array([delta]))
        s, peak = prob.corr.refine(z[0], s, float(norm[0]), 6)
    return delta, s, peak


def reference_by_peak(
    prob: Problem, candidates: np.ndarray, nominal: np.ndarray, used: np.ndarray, rng_nm: float
) -> tuple[int, np.ndarray]:
    """The candidate whose used neighbours (±1) match it best: the mean correlation peak of
    each neighbour against it through the weak-phase transfer (:func:`match_reference`, drift
    within ``max_drift_px``). Returns (the chosen frame, the mean peak of every candidate)."""
    n = len(nominal)
    env_s = prob.bt.spatial(nominal)
    window = (np.zeros(2), prob.params.max_drift_px)
    pairs = [(c, j) for c in candidates for j in (c - 1, c + 1) if 0 <= j < n and used[j]]
    peaks = map_images(
        lambda k: match_reference(prob, pairs[k][1], pairs[k][0], nominal, env_s,
                                  nominal[pairs[k][1]], rng_nm, window)[2],
        range(len(pairs)),
    )  # fmt: skip
    scores = np.zeros(len(candidates))
    for k, c in enumerate(candidates):
        mine = [p for (cc, _), p in zip(pairs, peaks, strict=True) if cc == c]
        scores[k] = float(np.mean(mine)) if mine else -np.inf
    return int(candidates[int(np.argmax(scores))]), scores


def first_pass(prob: Problem, ref: int, nominal: np.ndarray, used: np.ndarray, rng_nm: float):
    """Progressive registration outward from the reference.

    The nearest neighbours are matched to the reference through the weak-phase transfer; every
    further image (nearest first) against its prediction from the wave restored from the (≥ 3)
    images registered so far, its defocus searched around the line fitted to them and its
    shift within ``max_drift_px`` of their drift line.
    """
    n = len(nominal)
    d_abs = nominal.copy()
    shifts = np.zeros((n, 2))
    peaks = np.ones(n)
    env_s = prob.bt.spatial(nominal)
    done = [ref]
    order = sorted((i for i in range(n) if i != ref), key=lambda i: (abs(i - ref), i))
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # aligned spectrum, transfer per done
    for i in order:
        center = predict_defocus(nominal, d_abs, i, ref, np.array(done))
        window = (predict_shift(shifts, i, np.array(done)), prob.params.max_drift_px)
        near = len(done) < MIN_IMAGES or abs(i - ref) <= 1  # two images restore no wave
        delta, s, h = match_image(
            prob, i, ref, nearest_done(done, nominal, i), (d_abs, shifts, env_s), center, rng_nm,
            window,
            against_reference=near, rows=rows,
        )  # fmt: skip
        d_abs[i], shifts[i], peaks[i] = delta, s, h
        if used[i] and h >= prob.flag_level:
            done.append(i)
        elif used[i] and len(done) < MIN_IMAGES:  # low dose: keep going with what there is
            done.append(i)
    return d_abs, shifts, peaks


def nearest_done(done: list[int], nominal: np.ndarray, i: int) -> np.ndarray:
    """The (sorted) images done whose wave predicts image i in the first pass: the
    ``FIRST_PASS_WAVE_IMAGES`` nearest to it in nominal defocus (all when fewer), so that
    the first pass costs O(n) restorations, not O(n²)."""
    if len(done) <= FIRST_PASS_WAVE_IMAGES:
        return np.array(sorted(done))
    dist = np.abs(nominal[done] - nominal[i])
    keep = np.argsort(dist, kind="stable")[:FIRST_PASS_WAVE_IMAGES]
    return np.array(sorted(np.asarray(done)[keep]))


def match_image(
    prob: Problem,
    i: int,
    ref: int,
    done: np.ndarray,
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: float,
    rng_nm: float,
    window: tuple[np.ndarray, float],
    *,
    against_reference: bool,
    rows: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[float, np.ndarray, float]:
    """Defocus (nm), shift (px) and peak of image i: matched to the reference image through the
    weak-phase transfer (``against_reference``), else to its prediction from the wave restored
    from the images ``done`` (sorted indices; ``state`` = their defocus nm, shifts px and
    spatial envelopes), its defocus searched within ``rng_nm`` of ``center`` and its shift in
    ``window`` (centre px, radius px). ``rows``: a cache of the aligned spectrum and transfer
    of every image done (the first pass fixes them once an image is done)."""
    d_abs, shifts, env_s = state
    if against_reference:
        return match_reference(prob, i, ref, d_abs, env_s, center, rng_nm, window)
    if rows is None:
        aligned = prob.spectra[done] * shift_phase(prob.band, shifts[done])
        t = prob.bt.transfer(d_abs[done], env_s[done])
    else:
        new = [j for j in done if j not in rows]
        if new:
            a_new = prob.spectra[new] * shift_phase(prob.band, shifts[new])
            t_new = prob.bt.transfer(d_abs[new], env_s[new])
            rows.update({j: (a_new[k], t_new[k]) for k, j in enumerate(new)})
        aligned = np.stack([rows[j][0] for j in done])
        t = np.stack([rows[j][1] for j in done])
    sol = solve_series(
        aligned, t, prob.band, camera=prob.camera, corrections=1,
        prior_scale=prob.params.prior_scale, mask=prob.mask[done],
    )  # fmt: skip
    t_i = prob.bt.transfer(d_abs[i : i + 1], env_s[i : i + 1])
    quad_i = quadratic_term(prob.band, sol.phi, t_i, prob.camera)[0]
    return match_wave(prob, i, sol.phi, quad_i, env_s[i], center, rng_nm, None, window)


def predict_shift(shifts: np.ndarray, i: int, done: np.ndarray) -> np.ndarray:
    """Shift of image i extrapolated along the images done so far (a straight drift line)."""
    if done.size < 2:
        return shifts[done].mean(axis=0)
    coef = np.polyfit(done.astype(np.float64), shifts[done], 1)
    return coef[0] * i + coef[1]


def predict_defocus(nominal, d_abs, i, ref, done) -> float:
    """Defocus of image i predicted from the images done so far (a fitted step)."""
    if done.size < 2:
        return float(d_abs[ref] + nominal[i] - nominal[ref])
    slope, icpt = np.polyfit(nominal[done], d_abs[done], 1)
    return float(slope * nominal[i] + icpt)


def wave_pass(prob: Problem, ref, d_abs, shifts, peaks, used, rng_nm, wide=False, local=0.0):
    """One leave-one-out pass: each image against its prediction from the others.

    ``wide``: shifts searched by FFT over the whole field instead of refined from the last.
    ``local`` > 0 (nm; not with ``wide``): each defocus searched within ± that of the last
    first (a trust region), the full ± ``rng_nm`` only where the maximum is at its edge.
    """
    n = len(d_abs)
    env_s = prob.bt.spatial(d_abs)
    _, sol, quad, loo = loo_waves(prob, d_abs, shifts, used, prob.params.prior_scale, env_s)
    new_d, new_s, new_p = d_abs.copy(), shifts.copy(), peaks.copy()
    index = np.arange(n, dtype=np.float64)

    def one(i: int) -> tuple[float, np.ndarray, float]:
        center = d_abs[i]
        if wide:  # centre on the line through the other images (recovers a wrong start)
            others = used & (index != i)
            k, c = np.polyfit(index[others], d_abs[others], 1)
            center = float(k * i + c) if abs(k * i + c - d_abs[i]) > rng_nm / 2 else center
        # the reference is searched widely: if the others agree among themselves but sit a
        # lattice (or contrast-reversal) translation away from it, the gauge moves to them
        radius = prob.params.max_drift_px if i == ref else WAVE_SHIFT_WINDOW_PX
        window = (shifts[i], radius) if wide else None
        return match_wave(
            prob, i, loo[i], quad[i], env_s[i], center, rng_nm, None if wide else shifts[i], window,
            0.0 if wide else local,
        )  # fmt: skip

    for i, (d, s, h) in enumerate(map_images(one, range(n))):
        new_d[i], new_s[i], new_p[i] = d, s, h
    new_s -= new_s[ref]  # the reference defines the frame (its own fit sets the gauge)
    return new_d, new_s, new_p, sol.phi


class AmorphousStrategy:
    """A field with amorphous material (:class:`~.problem.Strategy`): relative defocus searched
    per image, the absolute defocus and A1 from the weak-phase relation of the restored wave
    (:func:`~.absolute.fit_chi_weak_phase`)."""

    def first_pass(self, prob: Problem, ref: int, nominal, used, range_nm: float):
        return first_pass(prob, ref, nominal, used, range_nm)

    def later_pass(self, prob: Problem, ref: int, nominal, state: PassState, used, range_nm):
        # the first wave pass searches as widely as the first pass (FFT shifts, ±range) so
        # that an image the reference-based start got wrong is recovered
        wide = state.passes == 0
        # once the last pass moved every defocus by less than TRUST_SETTLED_NM, search a
        # trust region about each estimate first (no coarse trials)
        local = TRUST_HALF_NM if state.last_change_nm < TRUST_SETTLED_NM else 0.0
        new_d, new_s, new_p, _ = wave_pass(
            prob, ref, state.d_abs, state.shifts, state.peaks, used,
            range_nm if wide else FINE_RANGE_NM, wide, local,
        )  # fmt: skip
        return new_d, new_s, new_p

    def flag_level(self, prob: Problem, peaks, used) -> float:
        return prob.flag_level

    def absolute(self, prob: Problem, d_abs, shifts, ok, basis, range_nm: float) -> ChiFit:
        return wave_absolute(
            prob, d_abs, shifts, ok, basis, range_nm, WAVE_CORRECTIONS, fit_chi_weak_phase
        )

    def finish(self, prob: Problem, ref: int, d_abs, shifts, peaks, used):
        """The shifts refined once more against a restoration-prior prediction
        (``shift_prior_scale``); the absolute defocus moved from the film's mid-plane to its
        exit surface when ``thickness_nm`` is known (module doc of the package)."""
        p = prob.params
        if p.shift_prior_scale is not None:
            ok = used & (peaks >= self.flag_level(prob, peaks, used))
            ok[ref] = True
            if ok.sum() >= MIN_IMAGES:
                shifts, _ = refine_shifts(prob, ref, d_abs, shifts, ok, p.shift_prior_scale)
        if p.thickness_nm is not None and p.absolute == "wave":
            d_abs = d_abs - 0.5 * float(p.thickness_nm)  # mid-plane → exit surface
        return d_abs, shifts

    def shifts_of_flagged(self, shifts, used, flagged):
        return shifts
