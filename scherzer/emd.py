"""Compatibility shim: the file layer now lives in :mod:`scherzer.io` (one module per job).

This module only re-exports the public names so existing ``from scherzer import emd`` /
``from scherzer.emd import ...`` imports keep working until they are switched to scherzer.io.
"""

from __future__ import annotations

from scherzer.io import (
    FORMAT_VERSION,
    EmdError,
    ImportedSignal,
    MemoryBudgetError,
    StackWriter,
    describe,
    import_signals,
    import_stack,
    import_stacks,
    nm_per_unit,
    read_processing,
    read_processing_summary,
    read_result,
    read_stack,
    read_stacks,
    read_table,
    repair,
    store_pipeline_result,
    write_processing,
    write_result,
    write_stack,
    write_table,
)

__all__ = [
    "FORMAT_VERSION",
    "EmdError",
    "ImportedSignal",
    "MemoryBudgetError",
    "StackWriter",
    "describe",
    "import_signals",
    "import_stack",
    "import_stacks",
    "nm_per_unit",
    "read_processing",
    "read_processing_summary",
    "read_result",
    "read_stack",
    "read_stacks",
    "read_table",
    "repair",
    "store_pipeline_result",
    "write_processing",
    "write_result",
    "write_stack",
    "write_table",
]
