"""Objective-lens physics and an emulated serial lens controller on a pseudo-terminal
(modules: model, protocol, emulator).

Units: nanometres for defocus C1 and two-fold astigmatism A1, degrees for the A1 angle, mrad for
beam tilt, seconds for time (``clock()`` returns seconds; it may be simulated time). Defocus is
negative for underfocus (DOMAIN.md).

Physics of :class:`LensModel`
-----------------------------
*Set-point and coil.* ``set_defocus_nm(x)`` changes the set-point ``x`` of the objective-lens
excitation. The excitation follows a first-order (exponential) response with time constant
``tau = settle_s / 5``: a step of size ``d`` leaves a residual ``d·exp(-t/tau)``, i.e. 0.7 % of the
step after ``settle_s``. After ``settle_s`` the lens counts as *settled*
(:meth:`LensModel.settle_remaining_s` reaches 0). ``settle_s = 0`` makes every change instantaneous.

*Hysteresis.* The magnetic focus lags the excitation with a play (backlash) operator of full width
``h = hysteresis_nm``: the magnetic set-point ``p`` stays inside ``[x - h/2, x + h/2]`` and moves
only when the excitation pushes it, ``p_new = clip(p_old, x - h/2, x + h/2)``. Approaching a value
from below therefore ends ``h/2`` short of it (``p = x - h/2``), approaching from above ends ``h/2``
beyond it (``p = x + h/2``); a reversal smaller than ``h`` leaves the focus unchanged. The lens
starts at ``p = x = 0`` (freshly normalised).

*Focal drift.* The column drifts in focus at ``focal_drift_nm_per_s`` from the model's creation:
``true = p(t) + drift·(t - t_created)``, where ``p(t)`` approaches ``p`` exponentially as above.

*Read-back.* The controller measures its own coil current, not the beam: the read-back is the
exponentially approached *set-point* ``x(t)`` (no hysteresis, no column drift) plus Gaussian noise
of standard deviation ``readback_noise_nm``, quantised to :data:`READBACK_QUANTUM_NM`. The
difference between true focus and read-back is what a focal-series restoration has to estimate.

*Stigmator.* Two-fold astigmatism A1 is set as (magnitude_nm, angle_deg); internally it is the
vector ``(m cos 2φ, m sin 2φ)`` (angles are 180°-periodic) whose components approach their targets
with the same time constant. No hysteresis on the stigmator. The read-back adds Gaussian noise of
``readback_noise_nm`` to each component and quantises magnitude to 0.1 nm and angle to 0.1°.
Angles are returned in [0, 180).

*Beam tilt.* Deflector coils are fast: the tilt (y, x) in mrad takes effect at once, no noise.

*Limits.* Defocus in ``limits.defocus_nm`` (inclusive), stigmator magnitude in
``[0, limits.stigmator_nm]``, each beam-tilt axis in ``[-limits.beam_tilt_mrad,
+limits.beam_tilt_mrad]``. A value outside (or not finite) raises
:class:`~scherzer.drivers.base.LimitExceeded` and changes nothing.

All public methods are thread-safe (one lock).
"""

from scherzer.simulators.lens_controller.emulator import FAULT_KINDS, LensControllerEmulator
from scherzer.simulators.lens_controller.model import (
    READBACK_QUANTUM_NM,
    LensModel,
    check_beam_tilt_mrad,
    check_defocus_nm,
    check_stigmator,
)
from scherzer.simulators.lens_controller.protocol import (
    EMULATOR_IDN,
    MAX_LINE_BYTES,
    SEQ_MODULUS,
    ErrorCode,
    Frame,
    FrameError,
    crc16_ccitt,
    decode_frame,
    encode_frame,
    parse_number,
    parse_status,
)

__all__ = [
    "EMULATOR_IDN",
    "FAULT_KINDS",
    "MAX_LINE_BYTES",
    "READBACK_QUANTUM_NM",
    "SEQ_MODULUS",
    "ErrorCode",
    "Frame",
    "FrameError",
    "LensControllerEmulator",
    "LensModel",
    "check_beam_tilt_mrad",
    "check_defocus_nm",
    "check_stigmator",
    "crc16_ccitt",
    "decode_frame",
    "encode_frame",
    "parse_number",
    "parse_status",
]
