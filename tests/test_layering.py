"""The dependency rules of ARCHITECTURE.md, checked on the import statements of every module.

cli/clients → daemon → drivers → simulators → processing → optics/stack. One stated exception:
simulators may import ``scherzer.drivers.base`` — the device-contract leaf (protocols, the
DeviceError family, limits, scan settings; it imports nothing above ``scherzer.stack``) — so the
emulated instruments raise exactly the errors real devices raise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scherzer"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.startswith("scherzer")}


def _modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))  # subpackages too (focal/, scan_distortion/ …)


FORBIDDEN = {
    "processing": ("scherzer.daemon", "scherzer.drivers", "scherzer.simulators", "scherzer.clients",
                   "scherzer.cli", "scherzer.io"),
    "simulators": ("scherzer.daemon", "scherzer.clients", "scherzer.cli"),
    "drivers": ("scherzer.daemon", "scherzer.clients", "scherzer.cli"),
}  # fmt: skip


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_no_upward_imports(sub: str) -> None:
    offenders = []
    for path in _modules(sub):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[sub]):
                offenders.append(f"{path.name} imports {name}")
    assert not offenders, offenders


def test_simulators_use_only_the_driver_contract() -> None:
    offenders = [
        f"{path.name} imports {name}"
        for path in _modules("simulators")
        for name in _imports(path)
        if name.startswith("scherzer.drivers") and name != "scherzer.drivers.base"
    ]
    assert not offenders, offenders


def test_driver_contract_is_a_leaf() -> None:
    allowed = {"scherzer.stack"}
    assert _imports(PACKAGE / "drivers" / "base.py") <= allowed


def test_core_models_import_nothing_above_them() -> None:
    assert _imports(PACKAGE / "workers.py") == set()
    assert _imports(PACKAGE / "optics.py") <= {"scherzer.workers"}
    assert _imports(PACKAGE / "stack.py") <= {"scherzer.optics"}


# --- the new layers: io, settings, validation, cli -------------------------------------------
def _all_modules(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def _offenders(sub: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in _all_modules(sub)
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_processing_subpackages_import_no_upper_layer():
    upper = (*FORBIDDEN["processing"], "scherzer.io", "scherzer.config")
    assert not _offenders("processing", upper)


def test_io_is_below_daemon_drivers_and_cli():
    upper = ("scherzer.daemon", "scherzer.drivers", "scherzer.clients", "scherzer.cli",
             "scherzer.simulators")  # fmt: skip
    assert not _offenders("io", upper)


def test_settings_and_validation_are_leaves():
    assert _imports(PACKAGE / "validation.py") == set()
    assert _imports(PACKAGE / "settings.py") <= {"scherzer.validation"}


def test_nothing_below_the_cli_and_the_web_view_imports_them():
    # the web view is a client of the daemon (web -> clients -> daemon); only config.py reads
    # its settings model (scherzer.web.settings imports nothing from scherzer)
    subs = ("daemon", "drivers", "simulators", "processing", "io", "clients")
    upper = ("scherzer.cli", "scherzer.web")
    assert not [o for sub in subs for o in _offenders(sub, upper)]
    assert _imports(PACKAGE / "web" / "settings.py") <= {"scherzer.config"}


# --- a house a newcomer can live in: sizes ----------------------------------------------------
MAX_MODULE_LINES = 800  # issue #10: no module over 800 lines (aim ≤ ~600)
MAX_FUNCTION_LINES = 120  # … and no function over 120 lines (aim: one screen)


def test_no_module_or_function_too_long():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.name}: {n} lines")
    assert not too_long, too_long
