"""Scherzer: TEM/STEM control daemon, faithful simulators and image processing.

The Python API (:mod:`scherzer.api`) is reachable from here without importing anything heavy at
``import scherzer``: ``scherzer.align(frames, alpha=0.5)``, ``scherzer.restore(stack, cs_mm=1.2)``,
``scherzer.as_stack(array, pixel_nm=0.02)``.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "align", "as_stack", "restore"]

_API = ("align", "as_stack", "restore", "AlignOutput", "RestoreOutput")


def __getattr__(name: str) -> Any:  # lazy: `import scherzer` stays light for the CLI
    if name in _API:
        from scherzer import api

        return getattr(api, name)
    raise AttributeError(f"module 'scherzer' has no attribute {name!r}")
