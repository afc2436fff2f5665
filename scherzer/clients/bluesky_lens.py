"""The objective lens as ophyd-async positioners: defocus, stigmator and beam tilt.

Each :class:`LensAxis` is a bluesky ``Movable``/``Locatable``: ``set(value)`` sends the value
through the daemon's ``lens_set`` (``wait_settled``: the daemon replies once the lens has
settled, with the read-back) and completes when that reply arrives; ``read()`` asks the daemon
(``lens_get``) for the current read-back. A reading holds the read-back under the axis's own
name (hinted, as for a motor) and the last requested value under ``<name>-setpoint``.

Units and conventions (``docs/protocol.md``): defocus C1 in nm, negative = underfocus;
two-fold stigmator as magnitude (nm) and angle (degrees); beam tilt (y, x) in mrad.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from bluesky.protocols import Location
from ophyd_async.core import (
    AsyncStatus,
    StandardReadable,
    StandardReadableFormat,
    soft_signal_r_and_setter,
)

from scherzer.clients.bluesky_link import DaemonLink
from scherzer.daemon import protocol as P

__all__ = ["AXES", "Lens", "LensAxis", "LensControl"]

#: Axis name → (units, how to read it from a LensState).
AXES: dict[str, tuple[str, Any]] = {
    "defocus_nm": ("nm", lambda s: s.defocus_nm),
    "stigmator_nm": ("nm", lambda s: s.stigmator_nm),
    "stigmator_deg": ("deg", lambda s: s.stigmator_deg),
    "beam_tilt_y_mrad": ("mrad", lambda s: s.beam_tilt_mrad[0]),
    "beam_tilt_x_mrad": ("mrad", lambda s: s.beam_tilt_mrad[1]),
}


class LensControl:
    """The daemon side of the lens shared by its axes (not a Device): sets and reads go one at
    a time (a lock orders them) and every reply's read-back is shown on every axis."""

    def __init__(self, link: DaemonLink) -> None:
        self._link = link
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[P.LensState], None]] = []

    def listen(self, show: Callable[[P.LensState], None]) -> None:
        self._listeners.append(show)

    def _show(self, state: P.LensState) -> P.LensState:
        for show in self._listeners:
            show(state)
        return state

    async def refresh(self) -> P.LensState:
        """Read the lens back from the daemon (``lens_get``) and update every axis."""
        async with self._lock:
            return self._show(await self._link.lens_get())

    async def apply(self, key: str, value: float) -> P.LensState:
        """Set one lens value through the daemon (``lens_set``, settled); the read-back."""
        async with self._lock:
            if key.startswith("beam_tilt"):
                y, x = (await self._link.lens_get()).beam_tilt_mrad  # the other one as it is
                params: dict[str, Any] = {
                    "beam_tilt_mrad": (value, x) if key == "beam_tilt_y_mrad" else (y, value)
                }
            else:
                params = {key: value}
            return self._show(await self._link.lens_set(**params, wait_settled=True))


class LensAxis(StandardReadable):
    """One lens value (``key``, one of :data:`AXES`) as a positioner over the daemon."""

    def __init__(self, control: LensControl, key: str, name: str = "") -> None:
        units, self._pick = AXES[key]
        self._control = control
        self.key = key
        with self.add_children_as_readables(StandardReadableFormat.HINTED_SIGNAL):
            self.readback, self._set_readback = soft_signal_r_and_setter(
                float, math.nan, units=units
            )
        with self.add_children_as_readables(StandardReadableFormat.UNCACHED_SIGNAL):
            self.setpoint, self._set_setpoint = soft_signal_r_and_setter(
                float, math.nan, units=units
            )
        control.listen(self._show)
        super().__init__(name=name)

    def set_name(self, name: str, **kw: Any) -> None:
        """Name the axis; its read-back takes the axis's own name (like a motor's)."""
        super().set_name(name, **kw)
        self.readback.set_name(name)

    def _show(self, state: P.LensState) -> None:
        self._set_readback(float(self._pick(state)))

    @AsyncStatus.wrap
    async def set(self, value: float) -> None:
        """Send ``value`` (in this axis's units) to the lens; done when the daemon has replied
        with the settled read-back (which :meth:`read` then reports)."""
        value = float(value)
        self._set_setpoint(value)
        await self._control.apply(self.key, value)

    async def read(self) -> dict[str, Any]:
        """The daemon's current read-back (asked now) and the last requested value."""
        await self._control.refresh()
        return await super().read()

    async def locate(self) -> Location[float]:
        """The last requested value (the read-back if none) and the current read-back."""
        await self._control.refresh()
        readback = await self.readback.get_value()
        setpoint = await self.setpoint.get_value()
        return {"setpoint": readback if math.isnan(setpoint) else setpoint, "readback": readback}


class Lens(StandardReadable):
    """The objective lens: one :class:`LensAxis` per value in :data:`AXES`.

    ``lens.defocus_nm`` is the defocus C1 (nm, negative = underfocus), ``stigmator_nm`` and
    ``stigmator_deg`` the two-fold stigmator, ``beam_tilt_y_mrad``/``beam_tilt_x_mrad`` the beam
    tilt (a set of one sends the other as it is now).
    """

    def __init__(self, link: DaemonLink, name: str = "") -> None:
        control = LensControl(link)
        with self.add_children_as_readables():
            self.defocus_nm = LensAxis(control, "defocus_nm")
            self.stigmator_nm = LensAxis(control, "stigmator_nm")
            self.stigmator_deg = LensAxis(control, "stigmator_deg")
            self.beam_tilt_y_mrad = LensAxis(control, "beam_tilt_y_mrad")
            self.beam_tilt_x_mrad = LensAxis(control, "beam_tilt_x_mrad")
        self.control = control
        super().__init__(name=name)
