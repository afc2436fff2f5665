"""From the configuration to the devices: one table row per device kind and per lens kind.

``DEVICE_KINDS[devices.kind]`` builds a :class:`Bench` (camera, scan generator, the kind's own
lens, timing and what job files record about the instrument); ``LENS_KINDS[devices.lens]`` then
picks the lens the daemon drives (the bench's own, or a controller on a serial line).
:func:`open_instruments` joins the two. A new vendor adapter is one module (its drivers and a
factory ``DeviceSettings -> Bench``) plus one row in :data:`DEVICE_KINDS` and its fields in
:class:`~scherzer.config.DeviceSettings`.

Factories take the typed :class:`~scherzer.config.DeviceSettings`, never a dict, and import their
drivers lazily so an optional vendor library is needed only when its kind is configured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scherzer.config import ConfigError, DeviceSettings
from scherzer.drivers.base import Lens
from scherzer.drivers.instruments import Instruments
from scherzer.drivers.simulated import (
    inject_faults,
    serve_simulated_lens,
    sim_instrument,
    virtual_microscope,
)

__all__ = ["DEVICE_KINDS", "LENS_KINDS", "Bench", "open_instruments"]


@dataclass
class Bench:
    """What a device-kind factory builds, before the lens is chosen.

    ``instruments`` holds the camera, scan generator and timing (its ``lens`` is unset);
    ``own_lens`` makes the kind's own objective-lens driver; ``scope`` is the simulated
    microscope behind the drivers (``None`` for real hardware); ``closers`` run at shutdown,
    first to last.
    """

    instruments: Instruments
    own_lens: Callable[[], Lens]
    scope: Any = None
    closers: list[Callable[[], None]] = field(default_factory=list)


def _open_sim(dev: DeviceSettings) -> Bench:
    """``sim``: the virtual microscope with physics and ground truth, and its EFTEM devices
    (energy filter, the camera after it, beam blanker; ``devices.read_only`` refuses their
    changes)."""
    from scherzer.drivers import sim

    scope = virtual_microscope(dev)
    if dev.fault:
        inject_faults(scope, dev.fault)
    energy_filter, filter_camera, blanker = sim.eftem_devices(
        scope, speedup=dev.speedup, seed=dev.seed, read_only=bool(dev.read_only)
    )

    def mark_truth_origin() -> None:
        scope.reset_truth()
        energy_filter.virtual.reset_truth()

    instruments = Instruments(
        camera=sim.SimCamera(scope, speedup=dev.speedup),
        scan=sim.SimScanGenerator(scope, speedup=dev.speedup),
        stage=sim.SimStage(scope),
        camera_shape=tuple(dev.camera_shape),
        wait_s=sim.SimTimer(scope, dev.speedup).pass_s,
        instrument=sim_instrument(scope, dev),
        dose_rate_e_per_A2_s=dev.dose_rate_e_per_A2_s,
        probe_current_pA=dev.probe_current_pA,
        mark_truth_origin=mark_truth_origin,
        energy_filter=energy_filter,
        filter_camera=filter_camera,
        blanker=blanker,
    )
    return Bench(instruments, lambda: sim.SimLens(scope, speedup=dev.speedup), scope)


def _open_pattern(dev: DeviceSettings) -> Bench:
    """``pattern``: exact test patterns, no physics (fast protocol tests, benchmarks)."""
    from scherzer.drivers import sim

    scope = sim.PatternBench(tuple(dev.camera_shape), dev.camera_pixel_nm)
    if dev.fault:
        inject_faults(scope, dev.fault)
    instruments = Instruments(
        camera=sim.PatternCamera(scope, speedup=dev.speedup),
        scan=sim.PatternScanGenerator(scope, speedup=dev.speedup),
        camera_shape=tuple(dev.camera_shape),
        wait_s=sim.SimTimer(scope, dev.speedup).pass_s,
    )
    return Bench(instruments, lambda: sim.PatternLens(scope), scope)


def _open_temscript(dev: DeviceSettings) -> Bench:
    """``temscript``: a Thermo Fisher / FEI microscope through temscript-server."""
    from scherzer.drivers.temscript import open_bench

    return open_bench(dev)


def _own_lens(bench: Bench, dev: DeviceSettings) -> Lens:
    """``sim``: the device kind's own objective lens."""
    return bench.own_lens()


def _serial_lens(bench: Bench, dev: DeviceSettings) -> Lens:
    """``serial``: a lens controller on ``serial_port``; ``serial-sim``: the simulated
    microscope's own lens served on a pseudo-terminal and driven over it."""
    from scherzer.drivers.serial_lens import SerialLens

    port = dev.serial_port
    if dev.lens == "serial-sim":
        port = serve_simulated_lens(bench.scope, dev.speedup, bench.closers)
    serial = SerialLens(
        port,
        baudrate=dev.serial_baudrate,
        timeout_s=dev.serial_timeout_s,
        retries=dev.serial_retries,
    )
    bench.closers.insert(0, serial.close)
    return serial


#: ``devices.kind`` → factory of the bench (camera, scan generator, own lens).
DEVICE_KINDS: dict[str, Callable[[DeviceSettings], Bench]] = {
    "sim": _open_sim,
    "pattern": _open_pattern,
    "temscript": _open_temscript,
}

#: ``devices.lens`` → factory of the lens the daemon drives, given the bench.
LENS_KINDS: dict[str, Callable[[Bench, DeviceSettings], Lens]] = {
    "sim": _own_lens,
    "serial": _serial_lens,
    "serial-sim": _serial_lens,
}


def open_instruments(dev: DeviceSettings) -> Instruments:
    """Build the configured devices: the ``devices.kind`` bench, then the ``devices.lens``."""
    try:
        make_bench, make_lens = DEVICE_KINDS[dev.kind], LENS_KINDS[dev.lens]
    except KeyError as exc:
        raise ConfigError(f"no driver for devices setting {exc.args[0]!r}") from exc
    bench = make_bench(dev)
    lens = make_lens(bench, dev)
    return dataclasses.replace(bench.instruments, lens=lens, closers=tuple(bench.closers))
