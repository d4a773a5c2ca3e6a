"""File fingerprints remembered per machine (``core.digest.remembered``): a file is hashed once
while its stat stays the same, again after any rewrite (issue #16: a 150 GB release was hashed
again for every new ``--out``)."""

from __future__ import annotations

import os

from locore.core import digest


def test_hashes_are_remembered_until_the_file_is_rewritten(tmp_path, monkeypatch):
    memo = tmp_path / "cache" / "fingerprints.json"
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"first")
    b.write_bytes(b"other")
    hashed = []
    original = digest.file_hash
    monkeypatch.setattr(digest, "file_hash", lambda p: (hashed.append(p), original(p))[1])
    first = digest.remembered([a, b], memo)
    assert [f.sha256 for f in first] == [original(a), original(b)] and len(hashed) == 2
    assert digest.remembered([a, b], memo) == first and len(hashed) == 2  # read from the memo
    # same size, mtime restored: the ctime still tells the rewrite
    stat = a.stat()
    a.write_bytes(b"again")
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = digest.remembered([a, b], memo)
    assert again[0].sha256 == original(a) != first[0].sha256 and again[1] == first[1]
    assert len(hashed) == 3
    # a damaged memo is ignored: everything is hashed again, then remembered again
    memo.write_text("{not json")
    assert digest.remembered([a, b], memo) == again and len(hashed) == 5


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCORE_CACHE", str(tmp_path / "mine"))
    assert digest.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LOCORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digest.cache_dir() == tmp_path / "xdg" / "locore"
