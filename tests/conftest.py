"""Shared pytest options: ``--device`` picks where model tests run (default cpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for model tests (cpu, cuda)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The torch device given with ``--device``; CUDA tests skip cleanly without a GPU."""
    name = request.config.getoption("--device")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--device cuda given but no CUDA device is available")
    return name


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Committed test data (golden outputs copied from the official code)."""
    return DATA
