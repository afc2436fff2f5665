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
    return sorted((PACKAGE / sub).glob("*.py"))


FORBIDDEN = {
    "processing": ("scherzer.daemon", "scherzer.drivers", "scherzer.simulators", "scherzer.clients",
                   "scherzer.cli", "scherzer.emd"),
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
    assert _imports(PACKAGE / "optics.py") == set()
    assert _imports(PACKAGE / "stack.py") <= {"scherzer.optics"}
