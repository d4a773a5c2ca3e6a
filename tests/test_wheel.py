"""The wheel is the product: built, installed into a fresh environment, run from an empty folder.

The fresh environment reuses this environment's third-party packages (torch, faiss, ...) through a
``.pth`` line, which adds their folder to ``sys.path`` without running its ``.pth`` files, so the
editable install of the source tree stays invisible: ``locore`` can only come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_COPY = {".git", ".venv", "demo_out", ".cache", "build", "dist"}


def _run(*cmd: str | Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the build never writes into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP_COPY])
    done = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        ".", "-w", tmp / "dist", cwd=src,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (path,) = (tmp / "dist").glob("locore-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """Python of a fresh environment with only the wheel installed (dependencies borrowed)."""
    env_dir = tmp_path_factory.mktemp("env")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run(
        python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=env_dir
    ).stdout.strip()
    (Path(purelib) / "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    done = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
        cwd=env_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return python


def test_wheel_carries_the_presets_and_the_demo_reranker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "locore/configs/pipelines/demo.yaml" in names
    assert "locore/rerank/checkpoints/locore_demo/model.safetensors" in names
    assert "locore/rerank/checkpoints/locore_demo/config.json" in names
    for name in ("model.safetensors", "config.json", "fusion.json"):
        assert f"locore/rerank/checkpoints/locore_offline/{name}" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"locore"}


def test_only_locore_is_importable_from_the_wheel(installed, tmp_path):
    site = Path(installed).parent.parent
    ours = sorted(
        p.name
        for p in site.glob("lib/python*/site-packages/*")
        if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "__pycache__"
    )
    assert ours == ["locore"], ours
    probe = "import locore, locore.engine.pipeline; print(locore.__file__)"
    done = _run(installed, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "site-packages/locore/__init__.py" in done.stdout
    for name in ("engine", "indexing", "rerank", "feature_extractors", "benchmarks"):
        assert _run(installed, "-c", f"import {name}", cwd=tmp_path).returncode != 0, name


def test_demo_runs_from_an_empty_folder_outside_the_repository(installed, tmp_path):
    """``locore demo`` needs nothing but the wheel: presets and the re-ranker come from it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = _run(installed.parent / "locore", "demo", "--out", "out", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout + done.stderr
    assert "Easy  Medium    Hard" in table
    assert "re-ranked: superglobal+locore" in table
    assert (tmp_path / "out" / "results.jsonl").is_file()
