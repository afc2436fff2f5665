"""Focal-series registration: per-image defocus and drift, absolute defocus and astigmatism.

Layout (one module per stage, each with one job)
-----------------------------------------------
``settings`` FocalParams, its tuning constants and automatic rules · ``inputs`` instrument
from the stack, camera offset, nominal-defocus checks, reference choice · ``search`` small
optimisers · ``problem`` spectra on the band, leave-one-out waves, the Correlator, the
specimen-strategy protocol · ``relative`` amorphous passes (AmorphousStrategy) · ``crystal``
crystal passes (CrystalStrategy) · ``absolute`` C1/A1 from the restored wave · ``agreement``
QFocus-like sector fits · ``joint`` one solution for all focus values · ``misfit`` whether the
imaging model predicts the images (thick crystals) and the fit that holds when it does not ·
``register`` the loop · ``structure`` the structure image. Plots are
in :mod:`scherzer.processing.plots`, the band/transfer kernel in
:mod:`scherzer.processing.spectral`.

Units and conventions
---------------------
* Numerics in Å / 1/Å through :mod:`scherzer.optics`; boundary names carry nm, px, deg.
  Defocus C1 < 0 is underfocus. ``relative_defocus_nm[i] = defocus_nm[i] − defocus_nm[ref]``.
* Shifts (ARCHITECTURE.md): ``shifts_px[i] = (dy, dx)`` is where frame i's content sits relative
  to the reference: frame_i(r) ≈ ref(r − s_i). The reference has (0, 0).
* Two-fold astigmatism A1 enters χ as π λ |A1| k² cos 2(φ − φ_A1) with the azimuth
  φ = atan2(k_y, k_x) of :mod:`scherzer.optics`: measured from the +x (column) axis towards the
  +y (row) axis, i.e. clockwise on screen when row 0 is at the top. ``astigmatism_deg`` is φ_A1
  in [0, 180).

Method
------
1. First pass (no wave yet): for each image n and trial defocus difference Δ, the reference and
   image spectra are compared through the weak-phase transfer, Z = S_n S_r* s_r s_n(Δ) / |S_n S_r|^α
   (s = sin χ · envelopes); the correlation peak over shifts is maximised over Δ. Images are
   taken outwards from the reference, each search centred on the defocus predicted from the
   step fitted so far (so a real step differing from the nominal one is followed).
2. Later passes: the wave is restored from all other images (leave-one-out 2×2 Wiener solve,
   :func:`scherzer.processing.spectral.solve_series`), image n is predicted from it at trial
   defoci, and the regularised correlation Z = S_n Y_n(Δ)* / |S_n Y_n(Δ)|^α is maximised over Δ
   and shift.
   Coarse Δ trials use batched FFTs of a cropped spectrum box; the fine search optimises Δ by
   Brent's method with the shift refined by Newton steps on the band (no FFTs). Once a pass
   has moved every defocus by less than 0.5 nm, the next searches ± 0.5 nm about each estimate
   first (no coarse trials; the full range where the maximum lies at that edge). Bands of
   ≥ 65536 frequencies (1024² fields) are split over the cores in the inner kernels.
   Peak height = the normalised correlation coefficient Re Σ X Y* e^{2πi g·s} / (‖X‖‖Y‖) ∈
   [−1, 1] of the (whitened) band spectra; below ``peak_threshold``, or below 5/√m (5σ of
   the correlation of pure noise over the m band frequencies), an image is flagged and left
   out of the wave. Passes repeat until Δ and shifts settle.
3. Absolute defocus and A1 from the restored wave: for a weak-phase object ψ = 1 + iP the
   product p(g) = φ(g) φ(−g) has phase π − 2Δχ(g), Δχ being the χ error of the model; we
   maximise Re Σ −p/|p| e^{2iΔχ} over C1 and A1 (this is minimum amplitude contrast written
   over all annuli and sectors at once). Alternatively (crystal-only fields) the defocus at which
   CTF-corrected images agree best in Fourier phase, per angular sector (QFocus-like).
4. Crystal-only fields (``FocalParams(crystal=True)``): drift chained image to image with a
   sign-free (squared) correlation and a smooth-drift window; one step scale for the series
   fitted on the Bragg spots (a crystal fixes each image's defocus poorly, a fixed step
   well); the absolute defocus from ψ − 1 = c·R(r) with R real and one complex c (the
   channelling picture: amplitude contrast allowed, in a fixed ratio to the phase contrast),
   A1 from rings of equal |g|.

5. Thick crystals (:mod:`.misfit`): after the passes every image is predicted from the wave
   restored from the series and compared with the measurement, per image and on the Bragg spots
   (residual over the noise of the spots' radial neighbours). Where dynamical scattering breaks
   the one-object-term model (measured: abTEM SrTiO3 4–8 cells 10–24× the noise, the
   simulator's 3 nm edge 42×, weak-phase films 0.9–1.2×) the registration says so (JSON
   ``model_fit``, a warning) and the focus steps take the step scale fitted on the spots with
   the wave restored at each trial, which the dynamical error does not bias the way it biases
   each image's own fit (abTEM 8 cells on 256²: relative RMS 1.24 → 0.22 nm).

Non-periodic fields
-------------------
Real images (and the simulator's crops of a larger specimen) are not periodic: content moves
in from outside the field as the delocalisation changes with defocus, and a crystal's strong
Bragg spots, whose dynamical model is the least exact, dominate a plain cross-correlation.
:meth:`FocalParams.for_field` detects such a field by its wrap-around edge jump
(:func:`edge_discontinuity`) and then tapers a tenth of the field, clips and half-whitens the
spots in the defocus search (shift and peak stay on the plain spectra), and on fields under
384 px drops the delocalisation limit. Periodic (synthetic) fields keep the plain settings.

Reference plane of the absolute defocus
---------------------------------------
``defocus_nm`` refers to the specimen's **exit surface**: the exit wave is defined there, the
restoration returns it, and the simulator's ground truth uses it. The weak-phase criterion of
step 3 finds the plane where the wave is most nearly a pure phase object; for an amorphous
film that is its mid-plane (the projection approximation holds there), t/2 upstream — measured
+0.87 nm for a 2 nm a-C film and +2.8 nm for 6 nm. Give ``FocalParams(thickness_nm=t)`` to move
the estimate to the exit surface; without it the mid-plane is reported. The crystal criterion
of step 4 locates the exit surface directly (channelling states are formed there); measured
within 0.8 nm for SrTiO3 [001] 1 nm and Si [110] 2–4 nm, but 4 nm off for SrTiO3 4 nm (its
Sr, TiO and O columns have different c: the one-c model fails for thick, mixed columns).
"""

from scherzer.processing.focal.agreement import (
    AgreementFit,
    fit_sectors,
    fit_start_phase_agreement,
    phase_agreement,
)
from scherzer.processing.focal.inputs import (
    camera_offset_counts,
    check_nominal_defocus,
    instrument_from_stack,
    intensity_frames,
)
from scherzer.processing.focal.register import (
    FocalRegistration,
    register_focal_series,
    restore_stack,
)
from scherzer.processing.focal.settings import (
    NONPERIODIC_EDGE_RATIO,
    FocalParams,
    edge_discontinuity,
)
from scherzer.processing.focal.structure import (
    StructureImageResult,
    StructureParams,
    structure_image,
)
from scherzer.processing.plots import plot_registration, plot_wave
from scherzer.processing.restoration import restore_exit_wave

__all__ = [
    "NONPERIODIC_EDGE_RATIO",
    "AgreementFit",
    "FocalParams",
    "FocalRegistration",
    "StructureImageResult",
    "StructureParams",
    "camera_offset_counts",
    "check_nominal_defocus",
    "edge_discontinuity",
    "fit_sectors",
    "fit_start_phase_agreement",
    "instrument_from_stack",
    "intensity_frames",
    "phase_agreement",
    "plot_registration",
    "plot_wave",
    "register_focal_series",
    "restore_exit_wave",
    "restore_stack",
    "structure_image",
]
