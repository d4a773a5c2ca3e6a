"""Speed and memory of the storage layer: global index build/search, local-store gathers.

Global index: synthetic L2-normalised descriptors clustered around 4,096 centres (real
collections are clustered; on uniform random vectors every approximate index looks bad), queries
near database items. Each kind is built in a fresh process, so its memory is its own: RSS growth
over the build (the index; the data itself is allocated before). Latency is the median of
``--repeats`` searches of ``--k`` neighbours for each query-batch size; recall@k is measured
against exact search for the approximate kinds.

Local store: a ``--store-images`` x ``--store-k`` float16 store (D = ``--store-dim``) is written to
``--store`` (keep it outside the repository), then ``--gather`` random images x ``--num-local``
descriptors are gathered, cold (page cache dropped before each trial; needs root) and warm (the
same ids again), with :meth:`LocalStore.gather` and with a naive per-image h5py loop for
reference. The store is deleted afterwards unless ``--keep-store``.

Usage (wired as ``locore bench index`` by the CLI, or directly):
    python -m locore.benchmarks.speed.index --n 1000000 --dim 768 --kinds flat ivfpq
    python -m locore.benchmarks.speed.index --skip-index --store SCRATCH/locore_store.h5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore, LocalStoreWriter

logger = logging.getLogger(__name__)

CENTRES = 4096
CAPACITY_IMAGES = {"ROxf+1M": 4_993 + 1_001_001, "RPar+1M": 6_322 + 1_001_001}


def rss_mib() -> float:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors ``[n, dim]`` and ``queries`` perturbed copies of database items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        block = centres[rng.integers(0, CENTRES, stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) / np.sqrt(dim)
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)]
    q = q + 0.3 * rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(dim)
    return x, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by blocks of the database (the recall reference)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(x), 200_000):
        s = q @ x[start : start + 200_000].T
        s_all = np.concatenate([best_s, s], 1)
        i_all = np.concatenate(
            [best_i, np.arange(start, start + s.shape[1])[None].repeat(len(q), 0)], 1
        )
        top = np.argpartition(-s_all, min(k, s_all.shape[1] - 1), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def measure_index(
    kind: str, n: int, dim: int, k: int, batches: list[int], repeats: int, options: dict, seed: int
) -> dict:
    """Build one index and time it (runs in a fresh process)."""
    x, q = synthetic(n, dim, max(batches), seed)
    before = rss_mib()
    start = time.perf_counter()
    index = GlobalIndex.build(dim, kind, **options)
    index.train(x)
    trained = time.perf_counter()
    index.add(x)
    built = time.perf_counter()
    result = {
        "kind": kind,
        "n": n,
        "dim": dim,
        "k": k,
        "options": {**options, **index.options},
        "train_s": trained - start,
        "build_s": built - start,
        "index_rss_mib": rss_mib() - before,
        "latency_ms": {},
    }
    for nq in batches:
        index.search(q[:nq], k)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            index.search(q[:nq], k)
            times.append((time.perf_counter() - t) * 1e3)
        result["latency_ms"][nq] = statistics.median(times)
    if kind not in ("flat", "torch"):
        _, ids = index.search(q, k)
        truth = exact_top(x, q, k)
        result["recall"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
    return result


def run_isolated(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(measure_index, *args).result()


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def write_store(path: Path, images: int, num_local: int, dim: int, seed: int) -> float:
    """A float16 store of random rows; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    batch = 1000
    with LocalStoreWriter(path, num_local, dim, capacity=images) as writer:
        for first in tqdm(range(0, images, batch), desc="write store", unit="batch"):
            b = min(batch, images - first)
            rows = rng.standard_normal((b, num_local, 5 + dim), dtype=np.float32)
            writer.append([f"img{i:07d}" for i in range(first, first + b)], rows)
    return time.perf_counter() - start


GATHER_METHODS = ("gather", "naive_h5py_loop", "h5py_fancy_index")


def measure_gather(
    path: Path, gather: int, num_local: int, trials: int, seed: int, names: list[str]
) -> dict:
    """Time ``gather`` images x ``num_local`` rows with each method in ``names``."""
    import h5py

    rng = np.random.default_rng(seed)
    result: dict = {"cold_dropped": drop_page_cache()}
    t = time.perf_counter()
    store = LocalStore(path)
    store.gather(np.zeros((1, 1), np.int64), num_local)  # builds the address table once
    result["open_and_map_s"] = time.perf_counter() - t
    result["images"] = len(store)
    timings: dict[str, list[float]] = {}

    def naive(ids: np.ndarray) -> None:
        with h5py.File(path, "r", locking=False, rdcc_nbytes=0) as f:
            ds = f["features"]
            np.stack([ds[int(i), :num_local] for i in ids]).astype(np.float32)

    def fancy(ids: np.ndarray) -> None:
        with h5py.File(path, "r", locking=False, rdcc_nbytes=0) as f:
            f["features"][np.sort(ids), :num_local].astype(np.float32)

    every = {
        "gather": lambda ids: store.gather(ids[None], num_local),
        "naive_h5py_loop": naive,
        "h5py_fancy_index": fancy,
    }
    methods = {name: every[name] for name in names}
    with store:
        for _ in range(trials):
            ids = rng.choice(len(store), gather, replace=False)
            for method, call in methods.items():
                for cache in ("cold", "warm"):
                    if cache == "cold":
                        drop_page_cache()
                    t = time.perf_counter()
                    call(ids)
                    timings.setdefault(f"{method}_{cache}", []).append(time.perf_counter() - t)
    for key, values in timings.items():
        seconds = statistics.median(values)
        result[key] = {"ms": seconds * 1e3, "images_per_s": gather / seconds}
    result["bytes_per_gather"] = gather * num_local * (5 + store.dim) * 2
    return result


def store_matches(path: Path, args: argparse.Namespace) -> bool:
    """Whether ``path`` is a finished store of the requested images, rows and width (reusable)."""
    try:
        with LocalStore(path) as store:
            shape = (len(store), store.num_local, store.dim)
    except Exception:  # any unreadable leftover is rewritten
        return False
    return shape == (args.store_images, args.store_k, args.store_dim)


def capacity_table(dim: int, bytes_overhead: float | None) -> list[str]:
    """Markdown rows: bytes per image and disk need for ROxf/RPar+1M."""
    lines = ["| stored L | dtype | bytes per image | ROxf+1M | RPar+1M |", "|---|---|---|---|---|"]
    for L in (48, 100):
        for name, size in (("float16", 2), ("float32", 4)):
            per_image = L * (5 + dim) * size + (bytes_overhead or 0)
            cells = [f"{per_image * n / 1e9:.1f} GB" for n in CAPACITY_IMAGES.values()]
            lines.append(f"| {L} | {name} | {per_image:,.0f} | {' | '.join(cells)} |")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``locore bench index``."""
    parser.add_argument("--n", type=int, default=1_000_000, help="database descriptors")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument(
        "--kinds", nargs="+", default=["flat", "ivfpq"], choices=["flat", "ivfpq", "hnsw", "torch"]
    )
    parser.add_argument("--k", type=int, default=400, help="neighbours per query")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 70], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--options", type=json.loads, default={}, help='ivfpq options as JSON: {"nprobe": 64}'
    )
    parser.add_argument("--skip-index", action="store_true", help="only the store part")
    parser.add_argument(
        "--store",
        type=Path,
        default=Path(tempfile.gettempdir()) / "locore_bench_store.h5",
        help="where the test store is written (a disk with room for it; default: the temp dir)",
    )
    parser.add_argument("--store-images", type=int, default=100_000)
    parser.add_argument("--store-k", type=int, default=100, help="descriptors stored per image")
    parser.add_argument("--store-dim", type=int, default=768)
    parser.add_argument("--gather", type=int, default=400, help="images per gather")
    parser.add_argument("--num-local", type=int, default=48, help="descriptors read per image")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", default=list(GATHER_METHODS), choices=GATHER_METHODS
    )
    parser.add_argument("--skip-store", action="store_true", help="only the index part")
    parser.add_argument("--keep-store", action="store_true", help="do not delete the store")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the selected parts and print markdown tables."""
    results: dict = {"index": [], "store": None}
    if not args.skip_index:
        latency = " | ".join(f"ms ({q} q)" for q in args.queries)
        print(f"| kind | n | train s | build s | index RSS MiB | {latency} | recall@k |")
        print("|---" * (6 + len(args.queries)) + "|")
        for kind in args.kinds:
            options = args.options if kind == "ivfpq" else {}
            r = run_isolated(
                kind, args.n, args.dim, args.k, args.queries, args.repeats, options, args.seed
            )
            results["index"].append(r)
            lat = " | ".join(f"{r['latency_ms'][q]:.1f}" for q in args.queries)
            rec = f"{r['recall']:.3f}" if "recall" in r else "exact"
            cells = f"{r['train_s']:.1f} | {r['build_s']:.1f} | {r['index_rss_mib']:,.0f}"
            print(f"| {kind} | {args.n:,} | {cells} | {lat} | {rec} |", flush=True)
    if not args.skip_store:
        path = args.store
        try:
            if path.exists() and not store_matches(path, args):
                print(f"{path} is not a complete store of this shape (interrupted?): rewriting")
                path.unlink()
            if not path.exists():
                write_s = write_store(
                    path, args.store_images, args.store_k, args.store_dim, args.seed
                )
                print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {write_s:.0f} s")
            r = measure_gather(
                path, args.gather, args.num_local, args.trials, args.seed, args.methods
            )
            on_disk = os.stat(path).st_blocks * 512
            raw = args.store_k * (5 + args.store_dim) * 2
            r["disk_bytes_per_image"] = on_disk / r["images"]
            r["overhead_bytes_per_image"] = on_disk / r["images"] - raw
            results["store"] = r
        finally:
            if not args.keep_store:
                path.unlink(missing_ok=True)
        if not r["cold_dropped"]:
            print("page cache could not be dropped (not root): 'cold' rows are not cold")
        print(f"open + address table: {r['open_and_map_s']:.2f} s for {r['images']:,} images")
        print("| method | cache | ms per gather | images/s |\n|---|---|---|---|")
        for method in args.methods:
            for cache in ("cold", "warm"):
                m = r[f"{method}_{cache}"]
                print(f"| {method} | {cache} | {m['ms']:.1f} | {m['images_per_s']:,.0f} |")
        overhead = r["overhead_bytes_per_image"]
        print(f"disk per image: {r['disk_bytes_per_image']:,.0f} B (overhead {overhead:,.0f} B)")
        print("\n".join(capacity_table(args.store_dim, r["overhead_bytes_per_image"])))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
