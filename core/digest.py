"""File fingerprints: size, modification time and a content hash.

An index entry remembers the fingerprint of the file it was extracted from, so that re-indexing a
folder can tell unchanged files from edited ones (and cache keys can name a file's content). Two
fingerprints are the *same file content* when size and hash agree; the modification time is
kept for the record (and to explain a change) but never decides one: copying a folder changes
every mtime, and a replaced file may keep its old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from locore.core.atomic import write_text

HASH = "sha256"
MEMO_FILE = "fingerprints.json"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies one file's content."""

    size: int  # bytes
    mtime_ns: int  # modification time, nanoseconds since the epoch
    sha256: str  # hex digest of the content

    def same_content(self, other: Fingerprint | None) -> bool:
        """True when ``other`` describes the same bytes (size and hash; mtime ignored)."""
        return other is not None and (self.size, self.sha256) == (other.size, other.sha256)

    def to_list(self) -> list:
        """``[size, mtime_ns, sha256]``: the compact form stored in JSON."""
        return [self.size, self.mtime_ns, self.sha256]

    @classmethod
    def from_list(cls, value: list) -> Fingerprint:
        size, mtime_ns, sha256 = value
        return cls(int(size), int(mtime_ns), str(sha256))


def file_hash(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def fingerprint(path: str | Path) -> Fingerprint:
    """Size, mtime and content hash of ``path``."""
    stat = os.stat(path)
    return Fingerprint(stat.st_size, stat.st_mtime_ns, file_hash(path))


def cache_dir() -> Path:
    """Where locore remembers file hashes between runs: ``$LOCORE_CACHE``, else
    ``$XDG_CACHE_HOME/locore``, else ``~/.cache/locore``."""
    if os.environ.get("LOCORE_CACHE"):
        return Path(os.environ["LOCORE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "locore"


def remembered(paths: Sequence[str | Path], memo: Path | None = None) -> list[Fingerprint]:
    """Fingerprints of ``paths``, each hash read from ``memo`` (default
    ``cache_dir() / fingerprints.json``) while the file's stat (size, mtime, ctime, inode) is
    the one recorded with it, and computed (and recorded) otherwise.

    Hashing a +1M release reads 150 GB; remembered per machine, not per output folder, it is
    read once however many runs use it. Any rewrite of a file changes its ctime, which no tool
    can set back. The memo is merged with what other processes recorded meanwhile and replaced
    atomically; an unreadable memo is ignored (the hashes are computed again).
    """
    memo = Path(memo) if memo is not None else cache_dir() / MEMO_FILE
    known = _read_memo(memo)
    found, new = [], {}
    for path in paths:
        stat = os.stat(path)
        key = str(Path(path).resolve())
        seen = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        entry = known.get(key)
        if entry is not None and entry.get("stat") == seen:
            found.append(Fingerprint.from_list(entry["fingerprint"]))
            continue
        print_ = fingerprint(path)
        new[key] = {"stat": seen, "fingerprint": print_.to_list()}
        found.append(print_)
    if new:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text(memo, json.dumps({**_read_memo(memo), **new}, indent=1, sort_keys=True))
    return found


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}
