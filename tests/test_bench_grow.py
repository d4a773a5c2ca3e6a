"""``locore bench grow``: its base is an index ``locore index`` accepts as up to date, and growing
it appends to the store in place (issue #16, "indexes that grow")."""

from __future__ import annotations

import json

import numpy as np

from locore.benchmarks import grow
from locore.cli import main
from locore.core.layout import LOCAL_FILE
from locore.engine.config import load_pipeline
from locore.engine.pipeline import SyncReport, build_index, open_index
from locore.indexing.local_store import LocalStore

SETTINGS = ["extractor.options.imsize=128", "extractor.options.num_local=16", "index.kind=flat"]


def test_base_is_up_to_date_and_growth_appends_in_place(tmp_path):
    out = tmp_path / "grow"
    base = grow.write_base(out, 60, SETTINGS[:2], "flat", seed=0)
    assert base["num_local"] == 16 and base["store_bytes"] > 0
    images, index = out / "images", out / "index"
    config = load_pipeline("demo", SETTINGS)
    same = build_index(images, index, config)
    assert same.sync == SyncReport(added=0, changed=0, removed=0, unchanged=60)
    assert same.extract.done == 0 and not same.trained
    store = index / LOCAL_FILE
    inode = store.stat().st_ino
    with LocalStore(store) as s:
        before = s.rows(np.arange(60))
    grow.add_images(images, 3, seed=0)
    grown = build_index(images, index, config)
    assert grown.sync == SyncReport(added=3, changed=0, removed=0, unchanged=60)
    assert grown.extract.done == 3 and not grown.trained
    assert store.stat().st_ino == inode  # appended to, not rewritten
    with LocalStore(store) as s:
        np.testing.assert_array_equal(s.rows(np.arange(60)), before)
    handle = open_index(index)
    try:
        assert len(handle.names) == 63 and handle.names[-1].startswith("added/")
    finally:
        handle.close()
    # the base is written once: a second call reuses it
    assert grow.write_base(out, 60, SETTINGS[:2], "flat", seed=0) == base


def test_the_command_measures_index_and_search(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "grow", "--n", "30", "--add", "2", "--out", str(out)]) == 0
    result = json.loads((out / "grow.json").read_text())
    grow_run = result["grow"]
    assert "2 added, 0 changed, 0 removed, 30 unchanged" in grow_run["output"]
    assert set(grow_run["stages"]) >= {"scan folder", "compare files", "extract", "global index"}
    assert list(result["search"]) == [
        "global only, cold", "global only, warm", "default chain, cold", "default chain, warm"
    ]  # fmt: skip
    # the index's chain (SuperGlobal + LoCoRe) ran, with LoCoRe fitted to the stored locals
    assert result["search"]["default chain, warm"]["stages"]["re-rank"] > 0
    assert result["search"]["global only, warm"]["stages"]["re-rank"] == 0
    assert "| default chain, warm |" in capsys.readouterr().out
