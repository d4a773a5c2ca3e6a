"""Ray jobs on a local two-CPU cluster give the single-process outputs bit for bit.

The reference is the single-process path (``extract`` into one folder, ``rerank_chain`` over all
queries) at one torch thread, the thread count of each actor (``cpus_per_worker=1``): CPU kernels
sum in another order with another thread count, so bit-for-bit holds at equal thread counts. The
Ray path splits the same work into chunks / query blocks on two actors. Row order may
differ between the two stores (shards are joined in chunk order), so descriptors are compared
name by name, and rankings by database name.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from test_bench_revisitop import _official_argv, _official_release, _release_checkpoint

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.cli import main
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.distributed import RayOptions, extract_on_ray, index_database, rerank_on_ray
from locore.engine.config import load_pipeline
from locore.engine.extract import Item, extract, shard_items
from locore.engine.pipeline import (
    build_extractor,
    build_index,
    extract_queries,
    first_stage,
    open_index,
    rerank_chain,
)
from locore.feature_extractors.io import list_images
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import read_raw_globals

SPEC = DemoSpec(easy=1, hard=1, junk=0, queries=1, train_views=1, distractors=4)
CONFIG = load_pipeline("demo", ["extractor.batch_size=2"])


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("ray") / "collection", SPEC)
    items = [Item(p.relative_to(root / "jpg").as_posix(), p) for p in list_images(root / "jpg")]
    return root, items


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(collection, tmp_path_factory):
    """One process, one folder, one thread: the single-process extraction."""
    _, items = collection
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(build_extractor(CONFIG.extractor), items, out, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    return by_name(out)


def actor_pids(class_name: str) -> list[int]:
    """Processes of live Ray actors of ``class_name`` (Ray titles them ``ray::...<class>...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith("ray::") and class_name in title:
            pids.append(int(proc.name))
    return pids


def by_name(folder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (local rows, global row) of an extraction folder."""
    with LocalStore(folder / LOCAL_FILE) as store:
        names = store.names
        rows = store.rows(np.arange(len(store)), store.num_local)
        globals_ = np.asarray(read_raw_globals(folder / GLOBAL_FILE, 1280, len(store), prefix=True))
    return {n: (rows[i], globals_[i]) for i, n in enumerate(names)}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, (rows, glob) in want.items():
        assert np.array_equal(got[name][0], rows), name
        assert np.array_equal(got[name][1], glob), name


def test_join_of_hand_made_shards_equals_one_extraction(
    collection, reference, tmp_path, one_thread
):
    _, items = collection
    extractor = build_extractor(CONFIG.extractor)
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, folder in enumerate(shards):
        extract(extractor, shard_items(items, (i, 3)), folder, batch_size=2)
    assert main(["join", "--out", str(tmp_path / "joined"), *map(str, shards)]) == 0
    assert_same(by_name(tmp_path / "joined"), reference)


def test_ray_extraction_equals_one_process_and_resumes(cluster, collection, reference, tmp_path):
    _, items = collection
    options = RayOptions(workers=2, chunk=3)
    report = extract_on_ray(CONFIG.extractor, items, tmp_path / "out", options)
    assert (report.total, report.done, report.resumed) == (len(items), len(items), 0)
    assert_same(by_name(tmp_path / "out"), reference)
    again = extract_on_ray(CONFIG.extractor, items, tmp_path / "out", options)
    assert (again.done, again.resumed) == (0, len(items))
    assert_same(by_name(tmp_path / "out"), reference)


def test_a_killed_actor_still_gives_identical_output(cluster, collection, reference, tmp_path):
    """SIGKILL one extraction actor once its first shard has rows: Ray restarts it, the chunk
    resumes in its shard folder, and the joined output is the single-process output."""
    _, items = collection
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(
        target=lambda: result.update(
            report=extract_on_ray(CONFIG.extractor, items, out, RayOptions(workers=2, chunk=2))
        )
    )
    job.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        if any(p.is_file() for p in (out / "shards").glob(f"*/{LOCAL_FILE}")):
            workers = actor_pids("ExtractChunks")
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    job.join(600)
    assert killed is not None, "no extraction actor was seen alive"
    assert result["report"].total == len(items)
    assert_same(by_name(out), reference)


def test_ray_reranking_equals_one_process(cluster, collection, tmp_path, one_thread):
    root, _ = collection
    config = load_pipeline("demo", ["search.topk=8"])
    build_index(root / "jpg", tmp_path / "index", config)
    handle = open_index(tmp_path / "index")
    try:
        paths = list_images(root / "queries")
        queries = extract_queries(build_extractor(config.extractor), paths)
        shortlist = first_stage(handle, queries, 8)
        want = rerank_chain(config.search.rerank, queries, shortlist, handle.database)
    finally:
        handle.close()
    options = RayOptions(workers=2, queries_per_task=1)
    opener = functools.partial(index_database, tmp_path / "index")
    got, stages = rerank_on_ray(opener, config.search.rerank, queries, shortlist, options)
    assert len(stages) == len(config.search.rerank)
    assert np.array_equal(got.ids, want.ids)
    assert np.array_equal(got.scores, want.scores)
    assert np.array_equal(got.before, want.before)


def test_cli_extract_on_ray(cluster, collection, reference, tmp_path, capsys):
    root, _ = collection
    args = ["extract", "--images", str(root / "jpg"), "--out", str(tmp_path / "out")]
    args += ["--config", "demo", "--set", "extractor.batch_size=2"]
    assert main([*args, "--ray", "--ray-workers", "2", "--ray-chunk", "4"]) == 0
    assert_same(by_name(tmp_path / "out"), reference)
    assert main([*args, "--address", "auto"]) == 2
    assert capsys.readouterr().err.strip().endswith("--address needs --ray")


def test_bench_revisitop_on_ray_equals_one_process(cluster, tmp_path, capsys, one_thread):
    """`bench revisitop --ray`: actors open the release's database themselves and run the chain
    on blocks of queries; every stage's cached ranking and the report equal a run in one process
    (both setups, Hard and Hard*, with junk moved by the chain)."""
    release = tmp_path / "release"
    _official_release(release, np.random.default_rng(1))
    checkpoint = _release_checkpoint(tmp_path)
    runs = {}
    for name, extra in (("here", []), ("ray", ["--ray", "--ray-workers", "2"])):
        out = tmp_path / name
        assert main(_official_argv(release, out, checkpoint, "--superglobal", *extra)) == 0
        runs[name] = out
    capsys.readouterr()
    for path in sorted((runs["here"] / "rerank").glob("*.npz")):
        with np.load(path) as want, np.load(runs["ray"] / "rerank" / path.name) as got:
            assert sorted(want.files) == sorted(got.files)
            for key in want.files:
                assert np.array_equal(want[key], got[key]), (path.name, key)
    here = (runs["here"] / "results.csv").read_text()
    assert here == (runs["ray"] / "results.csv").read_text()
