"""Maintenance commands: ``repair`` (a killed writer's file made readable by every reader) and
``db check`` / ``db recover`` (the daemon's job database)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scherzer.cli.common import Outcome, output_options

__all__ = ["DATABASE_FILE", "add_db", "add_repair"]

#: The job database's file name inside the daemon's data directory.
DATABASE_FILE = "jobs.sqlite"


def _repair(args: argparse.Namespace) -> Outcome:
    from scherzer.io.swmr import repair

    results = {str(path): repair(path) for path in args.files}
    lines = [
        f"{path}: {'write flags cleared' if cleared else 'nothing to clear'}; readable"
        for path, cleared in results.items()
    ]
    return 0, {"repaired": results}, "\n".join(lines)


def add_repair(sub: Any) -> None:
    p = sub.add_parser(
        "repair",
        help="make files of a killed writer readable by h5py, HyperSpy and others",
        parents=[output_options()],
        description=(
            "Clear the 'open for writing' flags a killed writer leaves in an HDF5 file (as "
            "h5clear -s does) and finalise Scherzer stacks at their complete frames. Run it only "
            "when no daemon is writing the file; the daemon does it itself at recovery."
        ),
    )
    p.add_argument("files", type=Path, nargs="+", help="HDF5 files to repair")
    p.set_defaults(func=_repair)


def _database(args: argparse.Namespace) -> tuple[Path, Path]:
    from scherzer.config import load_settings

    settings = load_settings(args.config)
    data_dir = settings.data_path
    return data_dir / DATABASE_FILE, data_dir


def _db_check(args: argparse.Namespace) -> Outcome:
    from scherzer.daemon.database import check_database

    path, _ = _database(args)
    result = check_database(path)
    text = f"{path}: ok" if result.ok else f"{path}: DAMAGED\n  " + "\n  ".join(result.problems)
    if not result.ok:
        text += "\nrun `scherzer db recover` to move it aside and rebuild it from the job files"
    return (0 if result.ok else 1), result.to_json(), text


def _db_recover(args: argparse.Namespace) -> Outcome:
    from scherzer.daemon.database import recover_database

    path, data_dir = _database(args)
    result = recover_database(path, data_dir)
    moved = ", ".join(str(p) for p in result.moved_to) or "nothing"
    text = f"moved aside: {moved}\nrebuilt {result.jobs_rebuilt} jobs from {data_dir / 'jobs'}"
    if result.unreadable_files:
        text += "\nunreadable job files: " + ", ".join(result.unreadable_files)
    return 0, result.to_json(), text


def add_db(sub: Any) -> None:
    p = sub.add_parser("db", help="the daemon's job database", parents=[output_options()])
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="{check,recover}")
    for name, func, text in (
        ("check", _db_check, "integrity check of the job database (exit 1 if damaged)"),
        ("recover", _db_recover, "move a damaged database aside and rebuild it from job files"),
    ):
        d = dsub.add_parser(name, help=text, parents=[output_options()])
        d.add_argument("--config", default=None,
                       help="the daemon's TOML settings (for its data directory)")  # fmt: skip
        d.set_defaults(func=func)
