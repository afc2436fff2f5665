"""Request handlers that drive the devices: lens, camera, scan generator, recent frames.

Each device call runs on the executor thread (:meth:`Executor.call_device`, refused with ``busy``
while a job owns the instruments) and answers through the daemon's mailbox; limits are checked in
the request loop first. Mixed into :class:`~scherzer.daemon.server.Daemon`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from scherzer.config import Settings
from scherzer.daemon import protocol as P
from scherzer.daemon.calls import Call, Deferred, Reply
from scherzer.daemon.executor import Executor
from scherzer.daemon.frames import FrameCache
from scherzer.drivers.base import DeviceError, ScanSettings
from scherzer.drivers.instruments import Instruments

__all__ = ["DeviceHandlers"]

ErrorCode = P.ErrorCode


class DeviceHandlers:
    """The device methods of the API (``lens_get``, ``lens_set``, ``camera_acquire``,
    ``scan_acquire``, ``frame_get``)."""

    settings: Settings
    executor: Executor
    frames: FrameCache
    devices_counter: int

    def finish(self, call: Call, reply: Reply | None, error: BaseException | None) -> None:
        raise NotImplementedError  # the daemon answers

    def _device(self, call: Call, fn: Callable[[Instruments], Reply], *, changes: bool) -> Deferred:
        def done(result: Reply | None, error: BaseException | None) -> None:
            if changes and error is None:
                self.devices_counter += 1
            self.finish(call, result, error)

        self.executor.call_device(fn, done)
        return Deferred()

    def _lens_get(self, call: Call, _: P.Empty) -> Deferred:
        return self._device(call, lambda ins: Reply(_lens_state(ins)), changes=False)

    def _lens_set(self, call: Call, p: P.LensSetParams) -> Deferred:
        def run(ins: Instruments) -> Reply:
            lens = _need(ins.lens, "lens")
            if p.defocus_nm is not None:
                lens.set_defocus_nm(p.defocus_nm)
            if p.stigmator_nm is not None or p.stigmator_deg is not None:
                m0, a0 = lens.get_stigmator()
                lens.set_stigmator(
                    m0 if p.stigmator_nm is None else p.stigmator_nm,
                    a0 if p.stigmator_deg is None else p.stigmator_deg,
                )
            if p.beam_tilt_mrad is not None:
                lens.set_beam_tilt_mrad(*p.beam_tilt_mrad)
            if p.wait_settled:
                lens.wait_settled(self.settings.devices.settle_timeout_s)
            call.log.info("lens set", **p.model_dump(exclude_none=True))
            return Reply(_lens_state(ins))

        return self._device(call, run, changes=True)

    def _camera_acquire(self, call: Call, p: P.CameraAcquireParams) -> Deferred:
        if p.exposure_s > self.settings.limits.max_exposure_s:
            raise P.ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"exposure_s {p.exposure_s} > limit {self.settings.limits.max_exposure_s}",
            )

        def run(ins: Instruments) -> Reply:
            f = _need(ins.camera, "camera").acquire(p.exposure_s, p.binning, p.region)
            info = self.frames.put(f.image, f.record, f.pixel_size_nm)
            return self._frames_reply([(info, f.image)], p.return_data)

        return self._device(call, run, changes=True)

    def _scan_acquire(self, call: Call, p: P.ScanAcquireParams) -> Deferred:
        limits = self.settings.limits
        lo, hi = limits.dwell_us
        if not lo <= p.dwell_us <= hi or max(p.size_px) > limits.max_scan_px:
            raise P.ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"dwell_us must be in [{lo}, {hi}] and size_px at most {limits.max_scan_px}",
            )
        if p.flyback_us > limits.max_flyback_us:
            raise P.ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"flyback_us {p.flyback_us} > limit {limits.max_flyback_us}",
            )
        settings = ScanSettings(
            size_px=p.size_px,
            pixel_nm=p.pixel_nm,
            dwell_us=p.dwell_us,
            flyback_us=p.flyback_us,
            rotation_deg=p.rotation_deg,
            signals=tuple(p.signals),
        )

        def run(ins: Instruments) -> Reply:
            scan = _need(ins.scan, "scan generator")
            scan.configure(settings)
            f = scan.acquire()
            pairs = [
                (self.frames.put(img, f.records[name], f.pixel_size_nm), img)
                for name, img in f.images.items()
            ]
            return self._frames_reply(pairs, p.return_data)

        return self._device(call, run, changes=True)

    def _frames_reply(self, pairs: list[tuple[P.FrameInfo, np.ndarray]], data: bool) -> Reply:
        infos = [info for info, _ in pairs]
        arrays = [(i.signal, np.ascontiguousarray(img, dtype=np.float32)) for i, img in pairs]
        return Reply(P.AcquireResult(frames=infos), arrays if data else [])

    def _frame_get(self, call: Call, p: P.FrameGetParams) -> Reply:
        image, info = self.frames.get(p.frame_id)
        return Reply(P.AcquireResult(frames=[info]), [(info.signal, image)])


def _need(device: Any, what: str) -> Any:
    if device is None:
        raise DeviceError(f"no {what} is configured in this daemon (see [devices] in the config)")
    return device


def _lens_state(ins: Instruments) -> P.LensState:
    lens = _need(ins.lens, "lens")
    m, a = lens.get_stigmator()
    return P.LensState(
        defocus_nm=lens.get_defocus_nm(),
        stigmator_nm=m,
        stigmator_deg=a,
        beam_tilt_mrad=lens.get_beam_tilt_mrad(),
    )
