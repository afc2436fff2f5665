"""Building the simulated benches behind the ``sim`` and ``pattern`` device kinds.

``sim``: a :class:`~scherzer.simulators.microscope.VirtualMicroscope` from the device settings
(specimen, camera, drift, dose rate, probe current, jitter, seed) with its ground-truth hooks;
``pattern``: the exact test-pattern bench (no physics). Both accept injected faults
(``devices.fault``) and can serve their objective lens on a pseudo-terminal through the lens
controller emulator (``devices.lens = "serial-sim"``), kept in simulated time by
:class:`SettleClock`. Units: s, nm, px as named.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from scherzer.config import ConfigError, DeviceSettings

__all__ = [
    "SETTLE_TICK_S",
    "SettleClock",
    "inject_faults",
    "serve_simulated_lens",
    "sim_instrument",
    "virtual_microscope",
]

#: How often the settle clock looks at the simulated lens: shorter follows real time more
#: finely while a serial client polls, at the cost of a busier thread.
SETTLE_TICK_S = 0.002


def inject_faults(microscope: Any, spec: str) -> None:
    """``"<kind>:<after_calls>[,<kind>:<after_calls>…]"`` (sim and pattern devices only)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, after = item.partition(":")
        microscope.inject_fault(kind, int(after or 0))


def virtual_microscope(dev: DeviceSettings) -> Any:
    """The simulated microscope the ``sim`` device settings describe."""
    from scherzer.simulators.microscope import DriftModel, VirtualMicroscope

    drift = DriftModel(
        velocity_nm_per_s=tuple(dev.drift_nm_per_s),
        random_walk_nm_per_sqrt_s=dev.drift_random_walk_nm_per_sqrt_s,
        seed=dev.seed + 1,
    )
    return VirtualMicroscope(
        dev.specimen,
        camera_shape=tuple(dev.camera_shape),
        camera_pixel_nm=dev.camera_pixel_nm,
        seed=dev.seed,
        drift=drift,
        dose_rate_e_per_A2_s=dev.dose_rate_e_per_A2_s,
        probe_current_pA=dev.probe_current_pA,
        scan_jitter_px=dev.scan_jitter_px,
    )


def sim_instrument(scope: Any, dev: DeviceSettings) -> dict[str, Any]:
    """What job files record about the simulated microscope (``/microscope``)."""
    from scherzer.simulators.detector import CameraModel

    camera = scope.camera if scope.camera is not None else CameraModel()
    return {
        "optics": scope.optics.with_(defocus_nm=0.0).model_dump(),
        "camera": camera.model_dump(),
        "convergence_mrad": float(scope.convergence_mrad),
        "probe_current_pA": float(scope.probe_current_pA),
        "simulated": True,
        "specimen": dev.specimen,
        "seed": dev.seed,
    }


class SettleClock(threading.Thread):
    """While the simulated lens settles, simulated time follows real time × ``speedup`` (a real
    column keeps time while a serial client polls its lens); otherwise simulated time moves only
    with acquisitions, as everywhere in the simulator."""

    def __init__(self, scope: Any, speedup: float, tick_s: float = SETTLE_TICK_S) -> None:
        super().__init__(name="scherzer-settle-clock", daemon=True)
        self._scope, self._speedup, self._tick_s = scope, speedup, tick_s
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._tick_s):
            remaining = self._scope.lens.settle_remaining_s()
            if remaining > 0:
                self._scope.clock.advance(min(remaining, self._tick_s * self._speedup))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=1.0)


def serve_simulated_lens(scope: Any, speedup: float, closers: list[Callable[[], None]]) -> str:
    """Serve the simulated microscope's own objective lens on a pseudo-terminal (the lens
    controller emulator) so the daemon drives it over a real serial link; returns the port.
    The emulator's and clock's stop functions are appended to ``closers``."""
    from scherzer.simulators.lens_controller import LensControllerEmulator, LensModel

    if not isinstance(getattr(scope, "lens", None), LensModel):
        raise ConfigError("lens 'serial-sim' needs the simulated microscope (devices.kind 'sim')")
    emulator = LensControllerEmulator(scope.lens)
    emulator.start()
    clock = SettleClock(scope, speedup)
    clock.start()
    closers.extend([emulator.stop, clock.stop])
    return emulator.port
