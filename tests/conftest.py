"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    """The real microscope files in ../shared/testdata (beside the repository, as in CI).

    Their absence fails the test: the format and accuracy tests are meaningless without them.
    """
    path = Path(__file__).resolve().parents[2] / "shared" / "testdata"
    if not (path / "README.md").is_file():
        pytest.fail(f"microscope test files not found at {path} (expected ../shared/testdata)")
    return path
