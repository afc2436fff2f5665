"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    """The real microscope files in ../shared/testdata (skips the test if they are absent)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "testdata"
    if not (path / "README.md").is_file():
        pytest.skip(f"microscope test files not found at {path} (expected ../shared/testdata)")
    return path
