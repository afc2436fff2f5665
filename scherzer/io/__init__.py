"""Scherzer's files: one module per job.

* :mod:`~scherzer.io.errors` — :class:`EmdError` and the existing-file check;
* :mod:`~scherzer.io.hdf5` — attribute dictionaries, JSON-able values, opening files;
* :mod:`~scherzer.io.superblock` — the HDF5 superblock's "open for writing" flags (``h5clear -s``);
* :mod:`~scherzer.io.swmr` — :func:`repair`: a killed writer's file made readable by every reader;
* :mod:`~scherzer.io.budget` — the read budget every reader checks declared shapes against;
* :mod:`~scherzer.io.axes` — length units to nm, axes from EMD ``dimK``;
* :mod:`~scherzer.io.emd` — image stacks in EMD 1.0: :func:`write_stack`, :class:`StackWriter`,
  :func:`read_stack`, :func:`read_stacks`;
* :mod:`~scherzer.io.hspy` — the HyperSpy (.hspy) view of every stack and result in our files;
* :mod:`~scherzer.io.results` — results, tables, processing records, pipeline results;
* :mod:`~scherzer.io.metadata` — instrument values from vendor metadata;
* :mod:`~scherzer.io.imports` — foreign formats: :func:`import_signals`, :func:`import_stack`;
* :mod:`~scherzer.io.rsciio_reader` — rosettasciio reads with the shapes checked first;
* :mod:`~scherzer.io.describe` — :func:`describe` (``scherzer info``).

The layout and its conventions are documented in ``docs/file-format.md``.
"""

from __future__ import annotations

from scherzer.io import swmr
from scherzer.io.axes import nm_per_unit
from scherzer.io.budget import MemoryBudgetError
from scherzer.io.describe import describe
from scherzer.io.emd import (
    StackWriter,
    read_stack,
    read_stacks,
    update_stack_metadata,
    write_stack,
)
from scherzer.io.errors import EmdError
from scherzer.io.hdf5 import FORMAT_VERSION
from scherzer.io.imports import ImportedSignal, import_signals, import_stack, import_stacks
from scherzer.io.results import (
    read_processing,
    read_processing_summary,
    read_result,
    read_table,
    store_pipeline_result,
    write_processing,
    write_result,
    write_table,
)
from scherzer.io.swmr import repair

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
    "swmr",
    "update_stack_metadata",
    "write_processing",
    "write_result",
    "write_stack",
    "write_table",
]
