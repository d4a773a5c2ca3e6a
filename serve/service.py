"""The search service behind the HTTP routes: models loaded once, queries answered in micro-batches.

Requests decode their upload and run the extractor's ``preprocess`` in the request's own thread,
then wait in a bounded queue. Two stage threads answer them, so that one batch is extracted
while the previous one is re-ranked:

    extract  takes every query already queued (at most ``max_batch``), waits up to
             ``max_wait_ms`` for uploads still being decoded (never when there are none), runs the
             extractor (one forward pass per input size) and one global search for the batch
    rerank   runs each chain on its queries (LoCoRe scores the lists of a batch together) and
             answers them

Each model has one owner: the extractor and the global index belong to the extract thread, the
re-ranking chains and the local store to the rerank thread, so no two threads race on a model;
other processes may open the same files. A stage working alone uses ``threads`` torch threads; while
both stages are busy each uses one, since two OpenMP teams on the same cores (or cores shared with
other jobs) spend their time spinning at barriers instead of computing.

A changed index (``locore index`` run again on the folder) becomes a new *generation*: a watcher
thread polls the metadata of the files that define the index (``config.yaml`` and the ``faiss/``
folder, which ``GlobalIndex.save`` replaces atomically and last). It opens the new index only
when that metadata has been stable for one poll, no ``locore index`` holds the folder's lock, and
the opened files agree with each other; then it hands the index to the extract thread, which
swaps it in between two batches and passes the old generation down the pipeline behind that
generation's last batch; the rerank thread closes it there. A request therefore sees one
generation from start to end, and the old generation's files stay readable until then (writers
replace files, they never shrink them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from locore.core.errors import UserError
from locore.engine.pipeline import (
    CONFIG_FILE,
    INDEX_SUBDIR,
    LOCK_FILE,
    IndexHandle,
    build_extractor,
    descriptor_mismatch,
    first_stage,
    open_index,
    to_results,
)
from locore.engine.results import result_records
from locore.feature_extractors import Extractor
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Queries
from locore.rerank.chain import Chain, build_chain
from locore.serve.uploads import RequestError

logger = logging.getLogger(__name__)

NO_RERANK = "none"  # the chain name that keeps the first-stage order
DEFAULT_CHAIN = "default"  # the configured chain (``search.rerank``)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How ``locore serve`` runs (command-line flags of the same names, where there is one)."""

    host: str = "127.0.0.1"  # loopback by default; any other address requires a token
    port: int = 8000
    token: str | None = None  # bearer token checked on every route but /healthz
    max_upload_bytes: int = 20 * 2**20  # larger uploads answer 413
    max_pixels: int = 40_000_000  # larger decoded images (50 MP photos, bombs) answer 413
    max_batch: int = 8  # queries per micro-batch
    max_wait_ms: float = 10.0  # how long a batch may wait for uploads still being decoded
    queue_size: int = 64  # waiting queries beyond which /search answers 503
    threads: int = 1  # torch threads of a stage working alone (one each while both work)
    refusals_burst: int = 10  # refused requests a client may send in a row ...
    refusals_per_s: float = 1.0  # ... and how fast that allowance comes back (then 429)
    reload_interval_s: float = 1.0  # how often the index folder is checked for changes
    thumb_size: int = 256  # long side of /image/{id}/thumb in pixels
    images: Path | None = None  # image folder; default: the one the index was built from


@dataclasses.dataclass
class Generation:
    """One opened state of the index folder."""

    number: int
    handle: IndexHandle
    signature: tuple
    images_root: Path | None  # folder the index names are relative to


@dataclasses.dataclass
class Job:
    """One query waiting for the stage threads; ``reply`` is called from a stage thread (after a
    failed batch possibly twice: the receiver keeps the first answer)."""

    input: torch.Tensor  # [3, H', W'] network input (``SearchService.prepare``)
    box: tuple[float, float, float, float] | None
    chain: str
    topk: int
    reply: Callable[[dict | Exception], None]
    queued: float = dataclasses.field(default_factory=time.perf_counter)


def writer_active(directory: Path) -> bool:
    """True while a ``locore index`` holds the folder's lock (it is writing)."""
    try:
        with open(directory / LOCK_FILE, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def index_signature(directory: Path) -> tuple | None:
    """(name, inode, size, mtime) of the files that define an index generation; None while the
    folder is being replaced (the ``faiss/`` rename is in progress)."""
    try:
        sub = directory / INDEX_SUBDIR
        paths = [directory / CONFIG_FILE, sub, *sorted(sub.iterdir())]
        return tuple(
            (p.name, st.st_ino, st.st_size, st.st_mtime_ns) for p in paths for st in [os.stat(p)]
        )
    except FileNotFoundError:
        return None


def ms(start: float, stop: float) -> float:
    """Milliseconds between two ``perf_counter`` readings, rounded for JSON."""
    return round((stop - start) * 1000.0, 2)


class Stats:
    """Request counts and a window of /search latencies (thread-safe)."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=window)
        self.batches = 0
        self.batched_queries = 0
        self.started = time.time()

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.counts[f"{route} {status}"] += 1
            if route == "/search" and status == 200:
                self.latencies.append(seconds * 1000.0)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_queries += size

    def snapshot(self) -> dict:
        with self._lock:
            lat = np.asarray(self.latencies)
            percentiles = (
                {f"p{p}": round(float(np.percentile(lat, p)), 2) for p in (50, 95, 99)}
                if lat.size
                else {}
            )
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": dict(sorted(self.counts.items())),
                "search_latency_ms": {"count": int(lat.size), **percentiles},
                "batches": self.batches,
                "mean_batch_size": round(self.batched_queries / max(self.batches, 1), 2),
            }


@dataclasses.dataclass
class Extracted:
    """One batch between the stages: extracted, searched, not yet re-ranked."""

    generation: Generation
    jobs: list[Job]
    queries: Queries  # [B, ...] one row per job
    shortlist: Shortlist  # [B, topk]
    started: float  # perf_counter when the extract stage took the batch
    extracted: float  # ... when extraction ended
    searched: float  # ... when the global search ended


class SearchService:
    """Loads the models once, owns the index generations and the two stage threads."""

    def __init__(self, index_dir: Path, overrides: Sequence[str], config: ServeConfig):
        self.index_dir = Path(index_dir)
        self.overrides = tuple(overrides)
        self.config = config
        self.stats = Stats()
        handle = open_index(self.index_dir, self.overrides)
        self.pipeline = handle.config
        self.extractor: Extractor = build_extractor(handle.config.extractor).eval()
        self.chains: dict[str, Chain] = {NO_RERANK: Chain([])}
        if handle.config.search.rerank:
            self.chains[DEFAULT_CHAIN] = build_chain(handle.config.search.rerank)
        self.current = self._generation(1, handle, index_signature(self.index_dir))
        self._pending: Generation | None = None
        self._candidate: tuple | None = None  # a changed signature seen once, not yet opened
        self._rejected: tuple | None = None  # a signature whose files could not be served
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        # extract -> rerank: one batch in flight, the old generation to close, or None (stop)
        self._handoff: queue.Queue[Extracted | Generation | None] = queue.Queue(maxsize=1)
        self._busy = 0  # stages working on a batch (guarded by _lock)
        self.incoming = 0  # requests decoding their upload (see arriving)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._extract_stage, name="locore-extract", daemon=True),
            threading.Thread(target=self._rerank_stage, name="locore-rerank", daemon=True),
            threading.Thread(target=self._watch, name="locore-reload", daemon=True),
        ]

    @property
    def default_chain(self) -> str:
        return DEFAULT_CHAIN if DEFAULT_CHAIN in self.chains else NO_RERANK

    def _generation(self, number: int, handle: IndexHandle, signature: tuple | None) -> Generation:
        root = self.config.images
        if root is None and handle.database.store is not None:
            stored = handle.database.store.attrs.get("images_root")
            root = Path(stored) if stored else None
        return Generation(number, handle, signature or (), root)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop the stages (the batches already taken are answered), refuse what is queued."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        while not self._queue.empty():
            self._queue.get_nowait().reply(RequestError(503, "the server is shutting down"))
        for generation in (self.current, self._pending):
            if generation is not None:
                generation.handle.close()

    # -- requests -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request between its arrival and :meth:`submit` (event-loop thread only), so
        that a batch waits for uploads still being decoded but a lone query never waits."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def check_chain(self, name: str) -> None:
        """RequestError 422 unless ``name`` is a configured chain."""
        if name not in self.chains:
            raise RequestError(422, f"unknown chain {name!r}; choose one of {sorted(self.chains)}")

    def prepare(self, image: np.ndarray, box: tuple[float, ...] | None) -> torch.Tensor:
        """The extractor's own preprocessing of a decoded upload, in the request's thread (it
        reads no weights); RequestError 422 when the region is too small for the network."""
        torch.set_num_threads(1)  # many requests preprocess at once: no OpenMP team for each
        try:
            return self.extractor.preprocess(image, box)
        except UserError as err:
            raise RequestError(422, str(err)) from None

    def submit(self, job: Job) -> None:
        """Queue ``job``; RequestError 503 when the queue is full, 422 for an unknown chain."""
        self.check_chain(job.chain)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, "the search queue is full; retry shortly") from None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # -- the stages ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Set this thread's torch threads for one batch: ``threads`` alone, one while the other
        stage works too (OpenMP thread counts are per calling thread)."""
        with self._lock:
            self._busy += 1
            alone = self._busy == 1
        torch.set_num_threads(self.config.threads if alone else 1)
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def _gather(self) -> list[Job] | None:
        """The next batch: every queued job (at most ``max_batch``), waiting up to
        ``max_wait_ms`` for uploads on their way; None when nothing came within 0.1 s."""
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return None
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000.0
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.perf_counter()
            if not self.incoming or left <= 0:  # wait only for uploads on their way
                break
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def _extract_stage(self) -> None:
        while not self._stop.is_set():
            batch = self._gather()
            self._swap()
            if batch is None:
                continue
            self.stats.batch(len(batch))
            try:
                with self._working():
                    extracted = self._extract(batch)
            except Exception as err:  # a bug: fail this batch, keep serving
                logger.exception("search batch failed in extraction")
                for job in batch:
                    job.reply(err)
                continue
            self._handoff.put(extracted)
        self._handoff.put(None)

    def _rerank_stage(self) -> None:
        while (item := self._handoff.get()) is not None:
            if isinstance(item, Generation):  # its last batch has been answered
                item.handle.close()
                continue
            try:
                with self._working():
                    self._rerank(item)
            except Exception as err:  # a bug: fail this batch, keep serving
                logger.exception("search batch failed in re-ranking")
                for job in item.jobs:
                    job.reply(err)

    def _extract(self, batch: list[Job]) -> Extracted:
        """Extraction (one forward pass per input size) and global search of one batch."""
        generation = self.current
        start = time.perf_counter()
        feats = [None] * len(batch)
        by_shape: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, job in enumerate(batch):
            by_shape[tuple(job.input.shape)].append(i)
        with torch.inference_mode():
            for idx in by_shape.values():
                x = torch.stack([batch[i].input for i in idx]).to(self.extractor.device)
                for i, f in zip(idx, self.extractor.extract_batch(x)):
                    feats[i] = f
        queries = Queries(
            global_desc=np.stack([f.global_desc for f in feats]).astype(np.float32),
            local_rows=np.stack([f.local.to_rows() for f in feats]),
        )
        extracted = time.perf_counter()
        shortlist = first_stage(generation.handle, queries, self.pipeline.search.topk)
        return Extracted(
            generation, batch, queries, shortlist, start, extracted, time.perf_counter()
        )

    def _rerank(self, batch: Extracted) -> None:
        """Each chain on its queries of ``batch``, then one reply per job."""
        generation, jobs, queries, shortlist = (
            batch.generation,
            batch.jobs,
            batch.queries,
            batch.shortlist,
        )
        names = generation.handle.names
        by_chain: dict[str, list[int]] = collections.defaultdict(list)
        for i, job in enumerate(jobs):
            by_chain[job.chain].append(i)
        for name, idx in by_chain.items():
            chain_start = time.perf_counter()
            sub_queries = Queries(queries.global_desc[idx], queries.local_rows[idx])
            sub_list = dataclasses.replace(
                shortlist, ids=shortlist.ids[idx], sims=shortlist.sims[idx]
            )
            final, _ = self.chains[name].run(sub_queries, sub_list, generation.handle.database)
            boxes = [jobs[i].box for i in idx]
            results = to_results(["upload"] * len(idx), boxes, sub_list, final)
            rerank_ms = (time.perf_counter() - chain_start) * 1000.0
            for i, result, before_ids, before_sims in zip(
                idx, results, sub_list.ids, sub_list.sims
            ):
                job = jobs[i]
                k = job.topk
                job.reply(
                    {
                        "chain": name,
                        "generation": generation.number,
                        "index_size": len(names),
                        "results": result_records([result], names, k)[0]["results"],
                        "before": [
                            {
                                "rank": r + 1,
                                "id": int(j),
                                "name": names[int(j)],
                                "global_score": float(s),
                            }
                            for r, (j, s) in enumerate(zip(before_ids[:k], before_sims[:k]))
                        ],
                        "timings_ms": {
                            "queue": ms(job.queued, batch.started),
                            "extract": ms(batch.started, batch.extracted),
                            "search": ms(batch.extracted, batch.searched),
                            "handoff": ms(batch.searched, chain_start),
                            "rerank": round(rerank_ms, 2),
                        },
                        "batch_size": len(jobs),
                    }
                )

    # -- index generations --------------------------------------------------------------------
    def _swap(self) -> None:
        """Put a pending generation in place (extract thread only, between batches); the old
        one goes down the pipeline behind its last batch and is closed by the rerank thread."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old, self.current = self.current, pending
        self._handoff.put(old)
        logger.info(
            "index generation %d: %d images (was %d)",
            pending.number,
            len(pending.handle.names),
            len(old.handle.names),
        )

    def _watch(self) -> None:
        while not self._stop.wait(self.config.reload_interval_s):
            try:
                self.check_index()
            except Exception as err:  # a half-written or broken folder: keep the current one
                logger.warning("index %s changed but is not served yet: %s", self.index_dir, err)

    def check_index(self) -> bool:
        """Open the index folder again if it changed and its metadata has been stable since the
        previous check; True when a new generation is waiting for the worker."""
        signature = index_signature(self.index_dir)
        latest = self._pending or self.current
        if signature is None or signature in (latest.signature, self._rejected):
            self._candidate = None
            return False
        if signature != self._candidate:  # still changing, or first sight: wait one poll
            self._candidate = signature
            return False
        if writer_active(self.index_dir):
            return False
        try:
            handle = open_index(self.index_dir, self.overrides)
        except UserError:
            self._rejected = signature  # e.g. half-updated: retried once the files change again
            raise
        try:
            self._check_consistent(handle)
            if index_signature(self.index_dir) != signature:
                raise UserError("the index changed while it was being opened")
        except BaseException:
            handle.close()
            self._rejected = signature
            raise
        generation = self._generation(latest.number + 1, handle, signature)
        with self._lock:
            stale, self._pending = self._pending, generation
        if stale is not None:
            stale.handle.close()
        self._candidate = None
        return True

    def _check_consistent(self, handle: IndexHandle) -> None:
        mismatch = descriptor_mismatch(self.pipeline.extractor, handle.config.extractor)
        if mismatch:
            raise UserError(f"the index was rebuilt with other descriptors ({mismatch}); restart")
        store = handle.database.store
        count = len(handle.names)
        if store is not None and (len(store) < count or store.names[:count] != handle.names):
            raise UserError("the local store does not hold the global index's images yet")
        if handle.database.global_desc.shape[0] != count:
            raise UserError("the global descriptors do not match the global index yet")

    def describe(self) -> dict:
        """Index, models and device, for /stats."""
        generation = self.current
        extractor = self.pipeline.extractor
        return {
            "index": str(self.index_dir),
            "generation": generation.number,
            "index_size": len(generation.handle.names),
            "extractor": {"name": extractor.name, "options": extractor.options},
            "device": str(self.extractor.device),
            "chains": {
                name: [stage.name for stage in chain.stages] for name, chain in self.chains.items()
            },
            "default_chain": self.default_chain,
            "queue": {"waiting": self.queued, "capacity": self.config.queue_size},
            "batching": {
                "max_batch": self.config.max_batch,
                "max_wait_ms": self.config.max_wait_ms,
                "threads": self.config.threads,
            },
        }
