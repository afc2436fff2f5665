"""The set of devices the daemon drives (:class:`Instruments`), whatever built them.

A leaf of the driver layer: the registry (:mod:`scherzer.drivers.registry`) builds one, the daemon
uses it. Units: as named (e per Å² per s, pA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from scherzer.drivers.base import BeamBlanker, Camera, EnergyFilter, Lens, ScanGenerator, Stage

__all__ = ["Instruments"]

log = structlog.get_logger("scherzer.drivers")


@dataclass
class Instruments:
    """The devices the daemon drives (any may be missing).

    ``instrument``: what is known about the microscope (optics as an Optics dump, camera model,
    …), written to every job file's ``/microscope``; ``dose_rate_e_per_A2_s`` (camera) and
    ``probe_current_pA`` (scan) feed the dose estimates; ``mark_truth_origin`` (simulators)
    makes "now" the origin of the ground-truth shifts. ``energy_filter`` (optional, like the
    stage): an imaging filter whose images come through ``filter_camera`` (a GIF's camera;
    None: through ``camera``); ``blanker`` blanks the beam for dark references.
    """

    camera: Camera | None = None
    scan: ScanGenerator | None = None
    lens: Lens | None = None
    stage: Stage | None = None
    camera_shape: tuple[int, int] = (512, 512)
    wait_s: Callable[[float], None] = lambda s: None
    closers: tuple[Callable[[], None], ...] = ()
    instrument: dict[str, Any] = field(default_factory=dict)
    dose_rate_e_per_A2_s: float | None = None
    probe_current_pA: float | None = None
    mark_truth_origin: Callable[[], None] | None = None
    energy_filter: EnergyFilter | None = None
    filter_camera: Camera | None = None
    blanker: BeamBlanker | None = None

    def describe(self) -> dict[str, str]:
        """Device names by kind; the optional EFTEM devices only when configured."""
        out = {
            kind: getattr(dev, "name", "?") if dev is not None else "none"
            for kind, dev in (
                ("camera", self.camera),
                ("scan", self.scan),
                ("lens", self.lens),
                ("stage", self.stage),
            )
        }
        for kind, dev in (
            ("energy_filter", self.energy_filter),
            ("filter_camera", self.filter_camera),
            ("blanker", self.blanker),
        ):
            if dev is not None:
                out[kind] = getattr(dev, "name", "?")
        return out

    def eftem_camera(self) -> Camera | None:
        """The camera that images through the energy filter."""
        return self.filter_camera if self.filter_camera is not None else self.camera

    def close(self) -> None:
        for close in self.closers:
            try:
                close()
            except Exception:
                log.exception("closing a device failed")
