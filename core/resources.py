"""Files that ship inside the package (presets, the demo re-ranker), found from anywhere.

Paths in presets never depend on the current directory: ``locore://rerank/checkpoints/x`` names
``checkpoints/x`` inside the installed ``locore.rerank`` package, which is the repository's
``rerank/`` folder in a source checkout and ``site-packages/locore/rerank`` after a wheel install.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SCHEME = "locore://"


def package_path(package: str) -> Path:
    """Folder of the subpackage ``locore.<package>`` on disk."""
    return Path(str(files(f"locore.{package}")))


CONFIG_ROOT = package_path("configs")  # configs/<kind>/<name>.yaml presets


def resolve_resource(source: str | Path) -> str | Path:
    """``locore://<subpackage>/<path>`` -> an absolute path inside the package; else unchanged."""
    text = str(source)
    if not text.startswith(SCHEME):
        return source
    package, _, rest = text[len(SCHEME) :].partition("/")
    return package_path(package) / rest
