"""Shared pytest options: ``--device`` picks where model tests run (default cpu); golden files.

Golden tests take a fixture ``<kind>_golden`` (``locore_golden``, ``extract_golden``): one test per
golden file ``<kind>_*.json`` in tests/data, or in the folder named by ``LOCORE_GOLDEN_DIR``, so any
golden file of the same format (other shapes, seeds, sizes) is checked by the same tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN_KINDS = ("locore", "extract")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hashes remembered by the code under test go to a folder of this run, never to the
    user's cache (``core.digest.cache_dir``; child processes inherit it)."""
    os.environ["LOCORE_CACHE"] = str(tmp_path_factory.mktemp("locore_cache"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for model tests (cpu, cuda)")


def golden_dir() -> Path:
    """Where golden files are read: ``LOCORE_GOLDEN_DIR`` or the committed tests/data."""
    return Path(os.environ.get("LOCORE_GOLDEN_DIR") or DATA)


def golden_stems(kind: str) -> list[Path]:
    """Every golden file of ``kind`` (its path without ``.json``); none found is an error."""
    folder = golden_dir()
    stems = sorted(p.with_suffix("") for p in folder.glob(f"{kind}_*.json"))
    if not stems:
        raise pytest.UsageError(f"no {kind}_*.json golden file in {folder} (LOCORE_GOLDEN_DIR)")
    return stems


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for kind in GOLDEN_KINDS:
        name = f"{kind}_golden_stem"
        if name in metafunc.fixturenames:
            stems = golden_stems(kind)
            metafunc.parametrize(name, stems, ids=[s.name for s in stems], scope="module")


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
