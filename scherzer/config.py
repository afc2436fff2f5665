"""Settings: one place for defaults, read from a TOML file with ``SCHERZER_…`` env overrides.

Precedence: built-in defaults < TOML file < environment, read by pydantic-settings. An environment
variable ``SCHERZER_<SECTION>__<FIELD>`` (double underscore between levels, case-insensitive)
overrides one field; lists and tables are given as JSON, e.g.
``SCHERZER_SERVER__ENDPOINT=tcp://127.0.0.1:6000``, ``SCHERZER_DEVICES__SPEEDUP=100`` or
``SCHERZER_DEVICES__CAMERA_SHAPE=[512,512]``.

Units are in field names (s, nm, µs, bytes).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scherzer.validation import format_validation_error
from scherzer.web.settings import WebSettings

__all__ = [
    "ClientKey",
    "ConfigError",
    "DeviceSettings",
    "PlanLimits",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "is_loopback_endpoint",
    "load_settings",
    "settings_to_toml",
]

ENV_PREFIX = "SCHERZER_"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the setting and what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    endpoint: str = "tcp://127.0.0.1:5577"
    events_endpoint: str = "tcp://127.0.0.1:5578"
    heartbeat_s: float = Field(2.0, gt=0)
    max_request_bytes: int = Field(1 << 20, ge=1024, description="JSON frame limit → too_large")
    max_frames: int = Field(4, ge=1, description="frames per request → too_large")
    max_message_bytes: int = Field(64 << 20, description="ZeroMQ drops peers sending more")
    local_role: Literal["observer", "operator"] = "operator"
    frame_cache: int = Field(32, ge=1, description="recent frames kept for frame_get")
    stop_timeout_s: float = Field(30.0, gt=0, description="wait for a frame boundary on stop")


class DeviceSettings(_Section):
    """Which instruments the daemon drives."""

    kind: Literal["sim", "pattern", "temscript"] = Field(
        "sim",
        description="sim: VirtualMicroscope; pattern: exact test patterns, no physics; "
        "temscript: a Thermo Fisher / FEI microscope through temscript-server (extra 'tfs')",
    )
    speedup: float = Field(1.0, gt=0, description="simulated time runs this much faster")
    specimen: str = "crystal_edge"
    camera_shape: tuple[int, int] = (512, 512)
    camera_pixel_nm: float = Field(0.02, gt=0)
    seed: int = 0
    lens: Literal["sim", "serial", "serial-sim"] = Field(
        "sim",
        description="sim: in-process; serial: a controller on serial_port; serial-sim: the "
        "simulated microscope's own lens served on a pseudo-terminal and driven over it",
    )
    serial_port: str = ""
    serial_baudrate: int = 115200
    serial_timeout_s: float = Field(0.5, gt=0)
    serial_retries: int = Field(2, ge=0)
    settle_timeout_s: float = Field(10.0, gt=0)
    drift_nm_per_s: tuple[float, float] = Field(
        (0.0, 0.0), description="sim only: constant specimen drift (y, x)"
    )
    drift_random_walk_nm_per_sqrt_s: float = Field(0.0, ge=0, description="sim only")
    dose_rate_e_per_A2_s: float = Field(1000.0, gt=0, description="sim only: camera dose rate")
    probe_current_pA: float = Field(20.0, gt=0, description="sim only: STEM probe current")
    scan_jitter_px: float = Field(0.1, ge=0, description="sim only: line jitter σ")
    fault: str = Field(
        "", description="sim only: '<kind>:<after_calls>[,…]' faults injected at start"
    )
    # --- temscript only (drivers/temscript.py; None = the driver's default) ---------------------
    temscript_url: str | None = Field(None, description="temscript-server, e.g. http://tem:8080")
    read_only: bool | None = Field(
        None,
        description="temscript and the simulated EFTEM devices: reads and acquisitions only",
    )
    temscript_timeout_s: float | None = Field(None, gt=0)
    temscript_acquire_margin_s: float | None = Field(None, ge=0)
    temscript_camera: str | None = None
    temscript_defocus_nm_per_unit: float | None = Field(None, allow_inf_nan=False)
    temscript_defocus_offset_nm: float | None = Field(None, allow_inf_nan=False)
    temscript_defocus_limits_nm: tuple[float, float] | None = None
    temscript_stigmator_nm_per_unit: float | None = Field(None, gt=0, allow_inf_nan=False)
    temscript_pixel_size_nm: float | None = Field(None, gt=0, allow_inf_nan=False)
    temscript_settle_s: float | None = Field(None, ge=0)
    temscript_stem_full_size_px: int | None = Field(None, ge=1)
    temscript_stem_field_nm_times_mag: float | None = Field(None, gt=0, allow_inf_nan=False)
    temscript_cs_mm: float | None = Field(None, allow_inf_nan=False)
    temscript_focal_spread_nm: float | None = Field(None, ge=0, allow_inf_nan=False)
    temscript_beam_divergence_mrad: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _serial_needs_port(self) -> DeviceSettings:
        if self.lens == "serial" and not self.serial_port:
            raise ValueError(
                "devices.lens = 'serial' needs devices.serial_port (e.g. /dev/ttyUSB0)"
            )
        return self


class PlanLimits(_Section):
    """What a plan may ask for; plans outside are refused with the reason."""

    defocus_nm: tuple[float, float] = (-5000.0, 5000.0)
    max_exposure_s: float = 60.0
    dwell_us: tuple[float, float] = (0.05, 1000.0)
    max_flyback_us: float = Field(10000.0, ge=0, description="scan line return time")
    max_scan_px: int = 4096
    max_frames: int = 10000
    min_free_disk_bytes: int = Field(
        100 << 20, ge=0, description="free space kept after every queued job's estimate"
    )
    max_job_duration_s: float = Field(
        30 * 86400.0, gt=0, description="a plan estimated to take longer is refused"
    )
    max_start_delay_s: float = Field(
        30 * 86400.0, gt=0, description="not_before_s at most this far in the future"
    )


class ClientKey(_Section):
    """One allowed CURVE client: its public key (Z85 text or a ``.key`` file) and role."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["observer", "operator"] = "observer"
    public_key: str = ""
    public_key_file: str = ""

    @model_validator(mode="after")
    def _one_key(self) -> ClientKey:
        if bool(self.public_key) == bool(self.public_key_file):
            raise ValueError(
                f"client {self.name!r}: give exactly one of public_key, public_key_file"
            )
        return self


class SecuritySettings(_Section):
    curve: bool = Field(False, description="require CURVE (always on for non-loopback binds)")
    server_secret_key_file: str = ""
    clients: list[ClientKey] = Field(default_factory=list)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    console: Literal["auto", "pretty", "json", "off"] = "auto"
    file_max_mb: float = Field(
        20.0, gt=0, le=10_000, description="the JSON log rotates at this size (MB)"
    )
    file_backups: int = Field(5, ge=1, le=100, description="rotated log files kept")


class Settings(_Section):
    data_dir: Path = Path("~/scherzer-data")
    calibrations_dir: Path | None = Field(
        None,
        description="camera curves (MTF/NPS) a plan may name, e.g. mtf = 'k2_300kv.csv'; "
        "requests never name a path the daemon opens outside this directory",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    devices: DeviceSettings = Field(default_factory=DeviceSettings)
    limits: PlanLimits = Field(default_factory=PlanLimits)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    web: WebSettings = Field(
        default_factory=WebSettings, description="the live web view (off by default)"
    )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def calibrations_path(self) -> Path | None:
        return None if self.calibrations_dir is None else Path(self.calibrations_dir).expanduser()

    def needs_curve(self) -> bool:
        """CURVE is on when asked for or when any endpoint is not loopback."""
        endpoints = (self.server.endpoint, self.server.events_endpoint)
        return self.security.curve or not all(is_loopback_endpoint(e) for e in endpoints)

    def check_security(self) -> None:
        """Refuse settings that would expose the instruments unauthenticated."""
        if not self.needs_curve():
            return
        if not self.security.server_secret_key_file:
            remote = [
                e
                for e in (self.server.endpoint, self.server.events_endpoint)
                if not is_loopback_endpoint(e)
            ]
            what = f"endpoint {remote[0]} is not loopback" if remote else "security.curve is on"
            raise ConfigError(
                f"{what}: "
                "set security.server_secret_key_file (make one with `scherzer keys new server`) "
                "and list allowed clients under [[security.clients]]"
            )
        if not self.security.clients:
            raise ConfigError("CURVE is on but security.clients is empty: no one could connect")


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        return False
    host = (parts.hostname or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def read_toml(path: str | Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file raises ``error`` naming ``what``."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{what} {p} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {p} is not valid TOML: {exc}") from exc


def _loader(path: Path | None, env: Mapping[str, str] | None) -> type[Settings]:
    """A pydantic-settings class over :class:`Settings` whose sources are, by priority, the
    ``SCHERZER_<SECTION>__<FIELD>`` environment (or ``env``) and the TOML file ``path``."""
    from pydantic_settings import (
        BaseSettings,
        EnvSettingsSource,
        SettingsConfigDict,
        TomlConfigSettingsSource,
    )

    class _Environment(EnvSettingsSource):
        def _load_env_vars(self) -> Mapping[str, str | None]:
            if env is None:
                return super()._load_env_vars()
            return {k.lower(): v for k, v in env.items()}

    class _Loaded(BaseSettings, Settings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", toml_file=path
        )

        @classmethod
        def settings_customise_sources(cls, settings_cls: Any, **_: Any) -> tuple[Any, ...]:
            toml = (TomlConfigSettingsSource(settings_cls),) if path is not None else ()
            return (_Environment(settings_cls), *toml)

    return _Loaded


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults < TOML ``path`` < ``SCHERZER_<SECTION>__<FIELD>`` environment (values as JSON
    where a field is a list or table), read by pydantic-settings; :class:`ConfigError` naming
    what is wrong."""
    p = None if path is None else Path(path)
    if p is not None:
        read_toml(p, ConfigError, "config file")  # a missing or malformed file: say so first
    try:
        loaded = _loader(p, env)()
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {format_validation_error(exc)}") from exc
    return Settings.model_validate(loaded.model_dump())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} {v!r} to TOML")


def settings_to_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """A nested dict (as :func:`load_settings` reads it) as TOML text."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        name = f"{_prefix}{key}"
        if isinstance(value, Mapping):
            body = settings_to_toml(value, f"{name}.")
            tables.append(f"[{name}]\n{body}")
        elif isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            tables += [f"[[{name}]]\n{settings_to_toml(x, f'{name}.')}" for x in value]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join([*lines, "", *tables]) if tables else "\n".join(lines) + "\n"
