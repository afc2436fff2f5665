"""The result of a non-rigid registration and its JSON summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scherzer.processing.scan_distortion.model import FieldSource
from scherzer.processing.scan_distortion.settings import NonrigidParams

__all__ = ["NonrigidResult"]


@dataclass
class NonrigidResult:
    """Corrected frames, merged image and the measured distortion of every frame.

    Orientation: everything is in the common orientation of the frames as given (frame 0's;
    see :func:`scherzer.processing.registration.rotate_to_common`), on the prepared grid.

    * ``corrected`` (n, H, W) float32: every frame resampled onto the reference grid (0 where
      the frame did not see; ``valid`` (n, H, W) bool says where it did).
    * ``average`` (H, W) float32: mean of the unflagged corrected frames, **NaN where no
      frame saw** (the only NaNs in the result); ``count`` (H, W) float32: frames per pixel.
      With ``params.merge == "density"``: the density-weighted merge and its kernel density
      (frames' pixels per output pixel; NaN where it is below a fifth of its median).
    * ``fields_px`` (n, 2, H, W) float32: (dy, dx) per pixel with frame_i(q) ≈ ref(q −
      f_i(q)) — the shift convention of rigid registration, per pixel. Held compactly
      (``fields``, a :class:`~.model.FieldSource`: the affine map, one (dy, dx) and rotation
      per scan line, a dense field only in unconstrained mode) and expanded when read: each
      read of ``fields_px`` builds the array (2 stacks); :meth:`field` gives one frame's.
    * ``affine`` (n, 6): (a0, a1, a2, a3, a4, a5) in each frame's *scan* coordinates: the
      position sampled by scan pixel (r, c) is (r + a0 + a1·ŕ + a2·ć, c + a3 + a4·ŕ + a5·ć)
      plus the non-linear part, ŕ, ć from the frame centre.
    * ``field_rms_px`` (n,): RMS of each field's non-affine part; ``flagged``: frames that
      could not be registered (excluded from the reference and the average); ``ncc`` (n,):
      each frame's correlation with the reference at the end.
    * ``history``: one entry per cycle (stage, mean |update| px, acceleration, tolerance).
    """

    corrected: np.ndarray
    valid: np.ndarray
    average: np.ndarray
    count: np.ndarray
    fields: FieldSource
    affine: np.ndarray
    field_rms_px: np.ndarray
    flagged: list[int]
    ncc: np.ndarray
    rigid_shifts_px: np.ndarray
    rotations_deg: np.ndarray
    params: NonrigidParams
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fields_px(self) -> np.ndarray:
        """All per-pixel fields (n, 2, H, W) float32, expanded from ``fields`` (a new array
        each time: keep it if it is needed more than once)."""
        return self.fields.expand()

    def field(self, i: int) -> np.ndarray:
        """Frame i's field (2, H, W) float32."""
        return self.fields[i]

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (no images): settings, seconds, per-frame affine parameters,
        field RMS, NCC, flagged frames, rigid start and the convergence history."""
        return {
            "seconds": round(self.seconds, 3),
            "frames": len(self.affine),
            "shape": list(self.average.shape),
            "rotations_deg": [float(r) for r in self.rotations_deg],
            "affine": np.round(self.affine, 6).tolist(),
            "field_rms_px": np.round(self.field_rms_px, 4).tolist(),
            "ncc": np.round(self.ncc, 4).tolist(),
            "flagged": [int(f) for f in self.flagged],
            "rigid_shifts_px": np.round(self.rigid_shifts_px, 4).tolist(),
            "history": self.history,
            "params": self.params.to_dict(),
        }
