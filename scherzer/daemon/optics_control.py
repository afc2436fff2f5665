"""Optics during a job: focus set from the plan's side (against hysteresis), what the plan changes
snapshotted before the first frame and put back afterwards. Mixed into
:class:`~scherzer.daemon.executor.Executor` (runs on its thread). Units: nm, s.
"""

from __future__ import annotations

from typing import Any

from scherzer.config import Settings
from scherzer.daemon.jobrun import JobRun, SavedOptics
from scherzer.daemon.plans import BasePlan, FrameStep, approach_setpoints
from scherzer.drivers.base import DeviceError, Lens, ScanSettings
from scherzer.drivers.instruments import Instruments

__all__ = ["OpticsControl"]


class OpticsControl:
    """Focus and scan settings of the executor's jobs."""

    instruments: Instruments
    settings: Settings
    _last_defocus_nm: float | None
    _nominal_defocus_nm: float | None

    def _lens(self) -> Lens:
        lens = self.instruments.lens
        if lens is None:
            raise DeviceError("this plan sets defocus but no lens is configured")
        return lens

    def _set_defocus(self, target_nm: float, plan: BasePlan) -> None:
        """Go to ``target_nm`` from the plan's approach side, waiting to settle after each set."""
        lens = self._lens()
        direction, overshoot = plan.approach_rule()
        for value in approach_setpoints(target_nm, self._last_defocus_nm, direction, overshoot):
            lens.set_defocus_nm(value)
            self._last_defocus_nm = None  # unknown until the set has settled
            lens.wait_settled(self.settings.devices.settle_timeout_s)
            self._last_defocus_nm = value

    def _snapshot(self, plan: BasePlan) -> SavedOptics:
        """What the plan will change, as it is now (read before the first frame)."""
        saved = SavedOptics()
        if not plan.restore_optics:
            return saved
        if any(s.defocus_nm is not None for s in plan.steps()):
            saved.defocus_nm = self._lens().get_defocus_nm()
        if plan.scan_sets() and self.instruments.scan is not None:
            current = getattr(self.instruments.scan, "settings", None)
            saved.scan_settings = current if isinstance(current, ScanSettings) else None
        return saved

    def _restore_optics(self, run: JobRun | None, saved: SavedOptics | None, jlog: Any) -> None:
        """Put back what the plan changed; never raises (a failure is logged as an error)."""
        if run is None or saved is None:
            return
        if saved.defocus_nm is not None and self._nominal_defocus_nm is not None:
            try:
                self._set_defocus(saved.defocus_nm, run.plan)
                jlog.info("focus restored", defocus_nm=saved.defocus_nm)
            except Exception as exc:
                jlog.error("could not restore the focus", defocus_nm=saved.defocus_nm,
                           error=str(exc))  # fmt: skip
        if saved.scan_settings is not None and self.instruments.scan is not None:
            try:
                self.instruments.scan.configure(saved.scan_settings)
            except Exception as exc:
                jlog.error("could not restore the scan settings", error=str(exc))

    def _set_optics(self, step: FrameStep, plan: BasePlan) -> None:
        if step.defocus_nm is not None:
            self._nominal_defocus_nm = step.defocus_nm
            self._set_defocus(step.defocus_nm, plan)
        if step.settle_s > 0:
            self.instruments.wait_s(step.settle_s)
