"""``locore serve``: the API over a small demo index, with FastAPI's test client.

Answers are compared with ``engine.pipeline.search`` on the same index (the CLI's path): the same
ids in the same order and the same scores within float32 round-off of the same computation
(rtol 1e-5, atol 1e-6; batched extraction may change the last bits of a convolution's sum).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import io
import shutil
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.benchmarks.speed.serve import png_declaring
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig
from locore.engine.evaluate import load_gnd
from locore.engine.pipeline import INDEX_SUBDIR, LOCK_FILE, build_index, open_index, search
from locore.feature_extractors.io import load_image
from locore.serve import serve_config
from locore.serve.app import create_app
from locore.serve.refusals import RefusalBudget, retry_after
from locore.serve.service import Job, SearchService, ServeConfig

SPEC = DemoSpec(easy=1, hard=1, junk=0, queries=1, train_views=1, distractors=2)
# The demo preset (LoCoRe re-ranking chain included) at a smaller input size, to keep tests fast.
OVERRIDES = ["extractor.options.imsize=256"]
HELD_OUT = 2  # database images left out of the index, added by the reload test


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(collection, image folder, index folder, held-out image paths, config)."""
    root = tmp_path_factory.mktemp("serve")
    collection = generate(root / "collection", SPEC)
    images = root / "db"
    images.mkdir()
    files = sorted((collection / "jpg").iterdir())
    for path in files[:-HELD_OUT]:
        shutil.copy(path, images / path.name)
    config = cfg.load(PipelineConfig, "demo", OVERRIDES)
    build_index(images, root / "index", config)
    return collection, images, root / "index", files[-HELD_OUT:], config


@pytest.fixture(scope="module")
def service(demo):
    # the bad-input tests send one refused request after another from one client
    config = ServeConfig(max_upload_bytes=2**20, reload_interval_s=60, refusals_burst=10_000)
    svc = SearchService(demo[2], [], config)
    svc.start()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


def queries(collection):
    """(path, box) of every demo query."""
    gt = load_gnd(collection / "gnd_demo.pkl")
    return [
        (collection / "queries" / f"{name}.jpg", tuple(g["bbx"]))
        for name, g in zip(gt["qimlist"], gt["gnd"])
    ]


def post(client, data: bytes, **form):
    return client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data=form)


def box_text(box) -> str:
    return ",".join(f"{v:.1f}" for v in box)


def expected(index_dir, path, box):
    handle = open_index(index_dir)
    try:
        return search(handle, [path], [box])[0], list(handle.names)
    finally:
        handle.close()


def test_search_matches_the_pipeline(demo, client):
    collection, _, index_dir, _, _ = demo
    path, box = queries(collection)[0]
    want, names = expected(index_dir, path, box)
    reply = post(client, path.read_bytes(), box=box_text(box), top_k="100").json()
    got = reply["results"]
    assert reply["chain"] == "default" and reply["index_size"] == len(names)
    assert [r["id"] for r in got] == [int(i) for i in want.ids]
    assert [r["name"] for r in got] == [names[int(i)] for i in want.ids]
    np.testing.assert_allclose([r["score"] for r in got], want.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [r["global_score"] for r in got], want.global_sims, rtol=1e-5, atol=1e-6
    )
    # ranks count from 1, as in `locore search --out` (engine/results.py)
    assert [r["rank"] for r in got] == list(range(1, len(got) + 1))
    assert [r["rank_before"] for r in got] == [int(r) + 1 for r in want.rank_before]
    # re-ranking moved something, and "before" is the first stage's order
    assert any(r["rank_before"] != r["rank"] for r in got)
    before = {r["rank"]: r["id"] for r in reply["before"]}
    assert all(before[r["rank_before"]] == r["id"] for r in got)
    assert set(reply["timings_ms"]) >= {"decode", "queue", "extract", "search", "rerank", "total"}


def test_chain_none_keeps_the_global_order_and_top_k(demo, client):
    collection = demo[0]
    path, box = queries(collection)[1]
    reply = post(client, path.read_bytes(), box=box_text(box), top_k="3", chain="none").json()
    assert reply["chain"] == "none" and len(reply["results"]) == 3
    assert [r["rank_before"] for r in reply["results"]] == [1, 2, 3]
    assert [r["id"] for r in reply["results"]] == [r["id"] for r in reply["before"]]


@pytest.mark.parametrize("max_batch, threads", [(4, 1), (1, 2)], ids=["one batch", "pipelined"])
def test_a_batch_answers_like_single_queries(demo, service, max_batch, threads):
    """Queued together, queries run as one batch (or as batches of one, extracted while the
    previous one is re-ranked) and each gets its own unbatched answer."""
    collection, _, index_dir, _, _ = demo
    cases = queries(collection)[:4]
    config = ServeConfig(
        queue_size=len(cases), max_batch=max_batch, threads=threads, reload_interval_s=60
    )
    svc = SearchService(index_dir, [], config)
    replies: dict[int, dict] = {}
    done = threading.Event()

    def reply_to(i):
        def reply(value):
            replies[i] = value
            if len(replies) == len(cases):
                done.set()

        return reply

    try:
        for i, (path, box) in enumerate(cases):  # queued before the worker starts
            svc.submit(Job(svc.prepare(load_image(path), box), box, "default", 100, reply_to(i)))
        client = TestClient(create_app(svc))
        full = post(client, cases[0][0].read_bytes())
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "queue is full" in full.json()["error"]
        svc.start()
        assert done.wait(120)
    finally:
        svc.close()
    for i, (path, box) in enumerate(cases):
        want, _ = expected(index_dir, path, box)
        got = replies[i]
        assert got["batch_size"] == max_batch
        assert [r["id"] for r in got["results"]] == [int(j) for j in want.ids]
        np.testing.assert_allclose(
            [r["score"] for r in got["results"]], want.scores, rtol=1e-5, atol=1e-6
        )


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(out, "JPEG")
    return out.getvalue()


BAD_UPLOADS = {
    "empty": (b"", {}, 400, "empty"),
    "not an image": (b"%PDF-1.4 hello", {}, 415, "not an image"),
    "truncated": (None, {}, 422, "truncated"),
    "too many bytes": (b"\xff\xd8" + b"\0" * (2**20 + 10), {}, 413, "over the limit"),
    "50 megapixels": (png_declaring(8660, 5774), {}, 413, "megapixels"),
    "decompression bomb": (png_declaring(40000, 40000), {}, 413, "pixels"),
    "tiny image": (jpeg(4, 4), {}, 422, "larger photo"),
    "box not numbers": (None, {"box": "a,b,c,d"}, 422, "box"),
    "box three numbers": (None, {"box": "1,2,3"}, 422, "box"),
    "box empty": (None, {"box": "50,50,50,80"}, 422, "box"),
    "box outside": (None, {"box": "0,0,5000,10"}, 422, "box"),
    "box too small": (None, {"box": "10,10,14,14"}, 422, "too small"),
    "unknown chain": (None, {"chain": "nope"}, 422, "unknown chain"),
    "top_k zero": (None, {"top_k": "0"}, 422, "top_k"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_input_is_a_4xx_naming_the_problem(demo, client, case):
    data, form, status, words = BAD_UPLOADS[case]
    good = queries(demo[0])[0][0].read_bytes()
    if data is None:
        data = good[: len(good) // 2] if case == "truncated" else good
    response = post(client, data, **form)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert post(client, good).status_code == 200  # the server keeps serving


def test_refusal_budget_refills_and_counts_refusals_only():
    now = [0.0]
    budget = RefusalBudget(burst=2, per_s=0.5, clock=lambda: now[0])
    for status in (200, 404, 429, 503):
        budget.charge("a", status)
    assert budget.wait("a") == 0.0
    budget.charge("a", 422)
    budget.charge("a", 401)
    assert budget.wait("a") == pytest.approx(2.0) and budget.wait("b") == 0.0
    now[0] = 1.0
    assert budget.wait("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert budget.wait("a") == 0.0
    budget.charge("a", 415)
    assert budget.wait("a") == pytest.approx(2.0)  # one token back, spent again
    assert retry_after(0.05) == "1" and retry_after(2.0) == "2"


def test_a_client_sending_junk_gets_429_and_others_are_served(demo, service, monkeypatch):
    """Past its allowance a client is answered 429 with Retry-After (after that wait) before
    its upload is read; another client, from the same address, is served as before."""
    config = dataclasses.replace(service.config, refusals_burst=2, refusals_per_s=20.0)
    monkeypatch.setattr(service, "config", config)
    app = create_app(service)
    junk = TestClient(app, client=("127.0.0.1", 40001))
    other = TestClient(app, client=("127.0.0.1", 40002))
    good = queries(demo[0])[0][0].read_bytes()
    assert [post(junk, b"").status_code for _ in range(2)] == [400, 400]
    refused = post(junk, good)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "too many refused requests" in refused.json()["error"]
    assert service.stats.snapshot()["requests"]["/search 429"] >= 1
    assert post(other, good).status_code == 200
    assert junk.get("/healthz").status_code == 200  # liveness is never held back
    time.sleep(0.1)  # two tokens back at 20 a second
    assert post(junk, good).status_code == 200


def test_missing_image_field_and_oversized_body(client, service):
    response = client.post("/search", data={"top_k": "3"})
    assert response.status_code == 422 and "image" in response.json()["error"]
    big = b"\0" * (service.config.max_upload_bytes + 2**17)
    response = post(client, big)
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_images_by_id_only(demo, client):
    _, images, index_dir, _, _ = demo
    handle = open_index(index_dir)
    names = list(handle.names)
    handle.close()
    response = client.get("/image/1")
    assert response.status_code == 200
    assert response.content == (images / names[1]).read_bytes()
    thumb = client.get("/image/1/thumb")
    assert thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert max(img.size) == 256
    assert client.get(f"/image/{len(names)}").status_code == 404
    assert client.get("/image/-1").status_code == 404
    for bad in ("..%2F..%2Fetc%2Fpasswd", "1.5", "%2Fetc%2Fpasswd"):
        assert client.get(f"/image/{bad}").status_code in (404, 422)


def test_stats_health_page_and_offline_docs(client):
    assert client.get("/healthz").json()["status"] == "ok"
    stats = client.get("/stats").json()
    assert stats["extractor"]["name"] == "efficientnet_lite0" and stats["device"] == "cpu"
    assert stats["chains"] == {"none": [], "default": ["superglobal", "locore", "diffusion"]}
    assert stats["requests"]["/search 200"] >= 1
    assert stats["search_latency_ms"]["p50"] <= stats["search_latency_ms"]["p99"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and "swagger-ui-bundle.js" in docs


def test_token_checked_everywhere_but_healthz(service, monkeypatch):
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, token="s3cret"))
    client = TestClient(create_app(service))
    assert client.get("/healthz").status_code == 200
    for route in ("/stats", "/", "/image/0", "/docs", "/static/app.js"):
        assert client.get(route).status_code == 401, route
    assert client.get("/stats", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/stats", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # the page: ?token= once, then a cookie
    assert client.get("/?token=s3cret", follow_redirects=False).status_code == 303
    assert client.get("/stats").status_code == 200


def test_non_loopback_needs_a_token(monkeypatch):
    args = argparse.Namespace(
        host="0.0.0.0",
        port=8000,
        token=None,
        images=None,
        max_upload_mb=20.0,
        max_megapixels=40.0,
        max_batch=8,
        max_wait_ms=2.0,
        queue_size=64,
        threads=1,
    )
    monkeypatch.delenv("LOCORE_SERVE_TOKEN", raising=False)
    with pytest.raises(UserError, match="token"):
        serve_config(args)
    monkeypatch.setenv("LOCORE_SERVE_TOKEN", "abc")
    assert serve_config(args).token == "abc"
    monkeypatch.delenv("LOCORE_SERVE_TOKEN")
    for host in ("127.0.0.1", "::1", "localhost"):
        assert serve_config(argparse.Namespace(**{**vars(args), "host": host})).token is None
    with pytest.raises(UserError, match="token"):  # a name may resolve anywhere
        serve_config(argparse.Namespace(**{**vars(args), "host": "example.org"}))


def test_index_update_is_picked_up_without_restart(demo, tmp_path):
    """`locore index` adds and removes images while serving: the new generation is adopted once
    its files are stable, unlocked and complete; until then every request sees the old one."""
    collection, images, index_dir, held_out, config = demo
    folder, index = tmp_path / "db", tmp_path / "index"
    shutil.copytree(images, folder)
    shutil.copytree(index_dir, index)
    svc = SearchService(index, [], ServeConfig(images=folder, reload_interval_s=60))
    svc.start()
    try:
        client = TestClient(create_app(svc))
        old_names = open_names(index)
        removed = old_names[0]
        (folder / removed).unlink()
        for path in held_out:
            shutil.copy(path, folder / path.name)
        build_index(folder, index, config)
        assert not svc.check_index()  # first sight of a change: wait until it is stable
        with open(index / LOCK_FILE, "a") as lock:  # a writer at work: not yet
            fcntl.flock(lock, fcntl.LOCK_EX)
            assert not svc.check_index()
            assert client.get("/healthz").json()["index_size"] == len(old_names)
        faiss = index / INDEX_SUBDIR
        faiss.rename(tmp_path / "moved")  # a save caught between its two renames
        assert not svc.check_index()
        (tmp_path / "moved").rename(faiss)
        assert not svc.check_index()  # seen again: needs one stable poll
        assert svc.check_index()
        new_names = open_names(index)
        path, box = queries(collection)[0]
        reply = post(client, path.read_bytes(), box=box_text(box), top_k="100").json()
        assert reply["generation"] == 2 and reply["index_size"] == len(old_names) + HELD_OUT - 1
        assert {r["name"] for r in reply["results"]} == set(new_names)
        assert removed not in new_names
        added = new_names.index(held_out[0].name)
        response = client.get(f"/image/{added}")
        assert response.content == held_out[0].read_bytes()
        assert not svc.check_index()  # nothing changed since
    finally:
        svc.close()


def open_names(index) -> list[str]:
    handle = open_index(index)
    try:
        return list(handle.names)
    finally:
        handle.close()
