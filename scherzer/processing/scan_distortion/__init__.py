"""Scan-distortion correction (non-rigid registration of scanned series) — pure numerics.

Entry points: :func:`correct_scan_distortion` (frames → :class:`NonrigidResult`),
:func:`apply_fields` (other signals at the same probe positions), :func:`apply_fields_to_si`
(spectrum-image series, channel-chunked), :class:`NonrigidParams` (settings),
:func:`prepare_frames` (the preparation steps alone), :func:`merge_density` (the
density-weighted merge of frames by their fields).
"""

from scherzer.processing.scan_distortion.apply import apply_fields, apply_fields_to_si
from scherzer.processing.scan_distortion.engine import correct_scan_distortion
from scherzer.processing.scan_distortion.merge import merge_density
from scherzer.processing.scan_distortion.prepare import prepare_frames
from scherzer.processing.scan_distortion.result import NonrigidResult
from scherzer.processing.scan_distortion.settings import (
    MODES,
    NonrigidParams,
    ScanDistortionError,
)

__all__ = [
    "MODES",
    "NonrigidParams",
    "NonrigidResult",
    "ScanDistortionError",
    "apply_fields",
    "apply_fields_to_si",
    "correct_scan_distortion",
    "merge_density",
    "prepare_frames",
]
