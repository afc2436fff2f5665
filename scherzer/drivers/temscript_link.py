"""The HTTP link to a temscript server: JSON transport only, bounded waits, DeviceError mapping.

temscript (PyPI ``temscript``, BSD) runs ``temscript-server`` on the microscope PC, an HTTP server
over the TEM Scripting COM interface; :class:`temscript.RemoteMicroscope` is its client. This
module wraps that client so every call

* speaks JSON only: the ``Accept`` header lists ``application/json`` alone and any other content
  type in a reply (e.g. ``application/python-pickle``) is an error — a pickle is never loaded;
* is bounded: each call has a socket timeout (``timeout_s``; acquisitions pass their own, the
  exposure or frame time plus a margin) and one lock serialises calls (HTTP/1.0, one request per
  connection, as temscript's server speaks);
* raises only :class:`~scherzer.drivers.base.DeviceError` subclasses, with the URL and what was
  being done in the message:

  ==============================================  ===========================================
  what happened                                   error (code)
  ==============================================  ===========================================
  no answer within the timeout                    DeviceTimeout (device_timeout)
  refused / reset / closed connection, no route   DeviceDisconnected (device_disconnected)
  HTTP 404 (endpoint or detector unknown)         DeviceError (device_error)
  HTTP 500 (the instrument raised; reason kept)   DeviceError (device_error)
  malformed JSON, wrong content type or shape     DeviceProtocolError (device_protocol_error)
  a change while read-only                        ReadOnlyRefused (limit_exceeded)
  ==============================================  ===========================================

Two URLs need no server: ``local`` opens temscript's COM microscope in this process (Windows,
on the microscope PC itself) and ``null`` its NullMicroscope (dry runs); their calls have no
transport, so no timeout, and any exception the microscope raises is a DeviceError.

After any failure the connection is dropped and the next call opens a new one, so a server that
comes back is used again without restarting anything.

Also here: :class:`TemscriptSettings` (the drivers' typed settings) and :class:`TemscriptPart`,
the base the lens, camera and scan generator share.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from scherzer.drivers.base import (
    DeviceDisconnected,
    DeviceError,
    DeviceProtocolError,
    DeviceReadOnly,
    DeviceTimeout,
    LensLimits,
    LimitExceeded,
)

__all__ = [
    "ReadOnlyRefused",
    "TemscriptLink",
    "TemscriptPart",
    "TemscriptSettings",
    "as_float",
    "as_pair",
    "check_finite",
    "parse_temscript_url",
]

T = TypeVar("T")

#: The only content type accepted from the server (temscript's JSON transport).
JSON_MIME = "application/json"
#: Oldest temscript server protocol this link speaks (the v1 HTTP API of temscript 2.x).
MIN_SERVER_MAJOR = 2
#: Default TCP port of ``temscript-server``.
DEFAULT_PORT = 8080
#: URLs that mean "no server, in this process": temscript's COM microscope (Windows, on the
#: microscope PC itself) or its NullMicroscope (dry runs). No timeout applies to these calls.
IN_PROCESS = {"local": "Microscope", "null": "NullMicroscope"}
#: Unit conversions at the temscript boundary (temscript: m, rad, s, µm for detector pixels).
NM_PER_M = 1e9
MRAD_PER_RAD = 1e3
NM_PER_UM = 1e3
US_PER_S = 1e6
#: Read-backs are rounded to this many decimals of a nm (1 fm): m ↔ nm float noise only.
READBACK_DECIMALS_NM = 6


class ReadOnlyRefused(DeviceReadOnly):
    """A change was asked for while the link is read-only; nothing was sent to the instrument
    (code ``device_read_only``)."""


def parse_temscript_url(url: str) -> tuple[str, int]:
    """``http://HOST[:PORT]`` → (host, port); only plain HTTP (what temscript-server speaks)."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"temscript URL must look like http://HOST:PORT; got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"temscript URL takes no path or query; got {url!r}")
    return parts.hostname, parts.port or DEFAULT_PORT


def _remote_class() -> type:
    try:
        from temscript import RemoteMicroscope
    except ImportError as exc:  # the optional extra is missing
        raise DeviceError(
            "devices.kind = 'temscript' needs the temscript package: pip install 'scherzer[tfs]'"
        ) from exc

    class JsonRemoteMicroscope(RemoteMicroscope):
        """RemoteMicroscope that connects lazily, speaks JSON only and never reuses a broken
        connection (temscript's own client leaves ``_conn`` as None after a timeout)."""

        def __init__(self, host: str, port: int, timeout_s: float) -> None:
            # no super().__init__: it connects at once and allows the pickle transport
            self.address = (host, port)
            self.timeout = timeout_s
            self.accepted_content = [JSON_MIME]
            self._conn = None

        def _request(
            self, method, endpoint, body=None, query=None, headers=None, accepted_response=None
        ):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(*self.address, timeout=self.timeout)
            self._conn.timeout = self.timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(self.timeout)
            try:
                return super()._request(method, endpoint, body, query, headers, accepted_response)
            except BaseException:
                self.drop()
                raise

        def drop(self) -> None:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    return JsonRemoteMicroscope


def _in_process_client(url: str) -> Any:
    """temscript's own microscope object for ``local`` (COM) or ``null``."""
    try:
        import temscript
    except ImportError as exc:
        raise DeviceError(
            "devices.kind = 'temscript' needs the temscript package: pip install 'scherzer[tfs]'"
        ) from exc
    try:
        return getattr(temscript, IN_PROCESS[url])()
    except Exception as exc:  # no COM (not Windows) or no TEM Scripting installed
        raise DeviceDisconnected(
            f"temscript: cannot open the {url!r} microscope in this process ({exc}); 'local' "
            "works only on the microscope PC — elsewhere run temscript-server there and give its "
            "http:// URL",
            details={"url": url},
        ) from exc


class TemscriptLink:
    """One temscript server: ``read`` and ``change`` run a call on its client under the rules
    of the module docstring. ``read_only`` refuses every ``change`` before anything is sent."""

    def __init__(
        self, url: str, *, timeout_s: float = 5.0, read_only: bool = False, name: str = "temscript"
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s}")
        self.url = url
        self.in_process = url in IN_PROCESS
        self.timeout_s = float(timeout_s)
        self.read_only = bool(read_only)
        self.name = name
        if self.in_process:
            self.host, self.port = url, 0
            self._client = _in_process_client(url)
        else:
            self.host, self.port = parse_temscript_url(url)
            self._client = _remote_class()(self.host, self.port, self.timeout_s)
        self._lock = threading.Lock()

    def check_server(self) -> str:
        """The server's temscript version; DeviceProtocolError if it is older than 2.0."""
        version = self.read("reading the server version", lambda m: m.get_version())
        major = str(version).split(".", 1)[0]
        if not major.isdigit() or int(major) < MIN_SERVER_MAJOR:
            raise DeviceProtocolError(
                f"{self.name}: server at {self.url} reports temscript {version!r}; "
                f"version >= {MIN_SERVER_MAJOR}.0 is needed",
                device=self.name,
            )
        return str(version)

    def read(self, what: str, fn: Callable[[Any], T], *, timeout_s: float | None = None) -> T:
        """Run ``fn(client)`` (a query or an acquisition); ``what`` names it in errors."""
        return self._call(what, fn, timeout_s)

    def change(self, what: str, fn: Callable[[Any], T], *, timeout_s: float | None = None) -> T:
        """Like :meth:`read` for a call that changes the instrument; refused when read-only."""
        if self.read_only:
            raise ReadOnlyRefused(
                f"{self.name}: read-only mode refuses {what}; nothing was sent to the microscope "
                "(set devices.read_only = false once reads and acquisitions are trusted)",
                device=self.name,
                details={"read_only": True},
            )
        return self._call(what, fn, timeout_s)

    def close(self) -> None:
        with self._lock:
            if not self.in_process:
                self._client.drop()

    def _call(self, what: str, fn: Callable[[Any], T], timeout_s: float | None) -> T:
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        with self._lock:
            if not self.in_process:
                self._client.timeout = timeout
            try:
                return fn(self._client)
            except DeviceError:
                raise
            except Exception as exc:
                raise self._device_error(exc, what, timeout) from exc
            finally:
                if not self.in_process:
                    self._client.timeout = self.timeout_s

    def _device_error(self, exc: Exception, what: str, timeout_s: float) -> DeviceError:
        where = f"{self.name}: {what} at {self.url}"
        info = {"url": self.url, "error": f"{type(exc).__name__}: {exc}"}
        if self.in_process:  # no transport: whatever the microscope raised
            return DeviceError(
                f"{where}: the microscope refused or failed ({type(exc).__name__}: {exc})",
                device=self.name,
                details=info,
            )
        if isinstance(exc, TimeoutError):
            return DeviceTimeout(
                f"{where}: no answer within {timeout_s:g} s; check the server is running and "
                "not blocked, or raise the timeout",
                device=self.name,
                details=info,
            )
        if isinstance(exc, ConnectionError | http.client.IncompleteRead):
            return DeviceDisconnected(
                f"{where}: the connection was refused or dropped ({exc}); is temscript-server "
                "running and reachable (firewall)?",
                device=self.name,
                details=info,
            )
        if isinstance(exc, KeyError) and str(exc).strip("'\"").startswith("Failed remote call"):
            return DeviceError(
                f"{where}: the server does not know this endpoint or detector (HTTP 404: {exc}); "
                "check the camera/detector names and the temscript version",
                device=self.name,
                details=info,
            )
        if isinstance(exc, RuntimeError) and "status" in str(exc):
            return DeviceError(
                f"{where}: the server reported an error ({exc}); the microscope refused or "
                "failed the call — see the temscript-server log on the microscope PC",
                device=self.name,
                details=info,
            )
        if isinstance(
            exc,
            ValueError
            | KeyError
            | TypeError
            | http.client.HTTPException
            | zlib.error
            | UnicodeError,
        ):
            return DeviceProtocolError(
                f"{where}: malformed reply ({type(exc).__name__}: {exc}); is this a temscript "
                "server speaking JSON?",
                device=self.name,
                details=info,
            )
        if isinstance(exc, OSError):  # no route, DNS failure, network down
            return DeviceDisconnected(
                f"{where}: cannot reach the server ({exc})", device=self.name, details=info
            )
        return DeviceError(f"{where}: {type(exc).__name__}: {exc}", device=self.name, details=info)


def as_float(value: Any, what: str, device: str) -> float:
    """A finite number from a reply, else DeviceProtocolError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DeviceProtocolError(
            f"{device}: {what}: expected a finite number, got {json.dumps(value)[:80]}",
            device=device,
        )
    return float(value)


def as_pair(value: Any, what: str, device: str) -> tuple[float, float]:
    """An (x, y) pair of finite numbers from a reply, else DeviceProtocolError."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise DeviceProtocolError(
            f"{device}: {what}: expected an (x, y) pair, got {json.dumps(value)[:80]}",
            device=device,
        )
    return as_float(value[0], what, device), as_float(value[1], what, device)


def _default_limits() -> LensLimits:
    return LensLimits(defocus_nm=(-2000.0, 2000.0), stigmator_nm=200.0, beam_tilt_mrad=10.0)


@dataclass(frozen=True)
class TemscriptSettings:
    """How to reach and convert one TFS instrument (units in the names).

    ``timeout_s``: per request; acquisitions wait their exposure/frame time plus
    ``acquire_margin_s``. ``readback_tolerance_nm``: largest |read-back − request| of a defocus
    set (beam tilt: ``readback_tolerance_mrad``). ``settle_s``: time given the objective lens
    after each change (TEM Scripting reports no settled state). ``camera``: "" = the first camera
    the server lists. ``stem_full_size_px``: scan size at image_size FULL and binning 1.
    ``stem_field_nm_times_mag``: STEM field of view (nm) × STEM magnification; when set, the scan
    generator sets the magnification for the requested pixel size, otherwise the requested pixel
    size is recorded as given. ``cs_mm``, ``focal_spread_nm`` (standard deviation) and
    ``beam_divergence_mrad`` (1/e semi-angle): the optics TEM Scripting does not report; when
    given they are recorded in every job file's ``instrument["optics"]`` beside the voltage, so
    focal-series processing needs no overrides.
    """

    url: str = "http://127.0.0.1:8080"
    read_only: bool = False
    timeout_s: float = 5.0
    acquire_margin_s: float = 30.0
    limits: LensLimits = field(default_factory=_default_limits)
    image_shift_limit_nm: float = 1000.0
    defocus_nm_per_unit: float = NM_PER_M
    defocus_offset_nm: float = 0.0
    readback_tolerance_nm: float = 0.01
    readback_tolerance_mrad: float = 1e-3
    stigmator_nm_per_unit: float | None = None
    stigmator_angle_offset_deg: float = 0.0
    settle_s: float = 0.0
    camera: str = ""
    pixel_size_nm: float | None = None
    stem_full_size_px: int = 2048
    stem_field_nm_times_mag: float | None = None
    cs_mm: float | None = None
    focal_spread_nm: float | None = None
    beam_divergence_mrad: float | None = None
    name: str = "temscript"

    def __post_init__(self) -> None:
        positive = {
            "timeout_s": self.timeout_s,
            "defocus_nm_per_unit": self.defocus_nm_per_unit,
            "acquire_margin_s": self.acquire_margin_s,
            "stem_full_size_px": self.stem_full_size_px,
        }
        bad = [k for k, v in positive.items() if not (math.isfinite(v) and v > 0)]
        for key in ("stigmator_nm_per_unit", "pixel_size_nm", "stem_field_nm_times_mag"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                bad.append(key)
        if bad or self.settle_s < 0:
            raise ValueError(f"temscript settings: {bad or ['settle_s']} must be > 0 (>= 0)")


class TemscriptPart:
    """Shared by the three devices: the link, the settings and a name in every message."""

    def __init__(self, link: TemscriptLink, settings: TemscriptSettings, name: str) -> None:
        self.link = link
        self.cfg = settings
        self.name = name

    def _float(self, value: Any, what: str) -> float:
        return as_float(value, f"{what} from {self.link.url}", self.name)

    def _pair(self, value: Any, what: str) -> tuple[float, float]:
        return as_pair(value, f"{what} from {self.link.url}", self.name)

    def _limit(self, message: str, **details: Any) -> LimitExceeded:
        return LimitExceeded(
            f"{self.name}: {message}; nothing was changed", device=self.name, details=details
        )


def check_finite(name: str, *values: float) -> None:
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise LimitExceeded(f"{name} must be finite numbers; got {values}; nothing was changed")
