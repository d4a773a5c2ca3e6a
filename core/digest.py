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
import os
from pathlib import Path

HASH = "sha256"


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
