"""The two Ray jobs: extraction of an image list and re-ranking of many shortlists.

Extraction. The image list is cut into chunks of ``RayOptions.chunk`` images; chunk ``k`` is
extracted by :func:`locore.engine.extract.extract` into its own shard folder
``OUT/shards/<k:06d>/``, by whichever actor Ray Data hands it to (an actor builds the extractor
once and keeps it). A chunk is the unit of scheduling, retry and resume: a worker that dies
mid-chunk leaves that shard's committed rows (the store is crash-safe), and the retried chunk
resumes in the same folder, so nothing is extracted twice and no image lands in two shards. At the
end the shards are joined in chunk order (:func:`locore.engine.join.join_extractions`), which
makes ``OUT`` an ordinary extraction folder.

Re-ranking. Queries travel in blocks of ``RayOptions.queries_per_task`` with their shortlists;
each actor opens the database once (an index folder, or a benchmark's collection) and runs the
chain (:meth:`locore.rerank.chain.Chain.run`) on its blocks; results are put back in query
order.

Both jobs use actors with ``max_restarts=-1`` and ``max_task_retries=-1``: a killed actor is
restarted and its unfinished block is run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from locore.core.errors import UserError
from locore.core.layout import LOCAL_FILE
from locore.engine.config import ExtractorConfig, StageConfig
from locore.engine.extract import SKIPPED_FILE, ExtractReport, Item, extract
from locore.engine.join import join_extractions
from locore.engine.pipeline import build_extractor, open_index
from locore.indexing.local_store import LocalStore
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries, RerankResult
from locore.rerank.chain import build_chain

logger = logging.getLogger(__name__)

SHARDS = "shards"  # OUT/shards/<chunk>/ holds one extraction folder per chunk


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs."""

    address: str | None = None  # None: Ray on this machine; "auto": the running cluster; ray://...
    workers: int | None = None  # actors; default: one per GPU of the cluster, else 1
    cpus_per_worker: float = 1  # CPU slots each actor holds (its torch thread count)
    chunk: int = 1000  # images per extraction shard: the unit of scheduling, retry and resume
    queries_per_task: int = 8  # queries re-ranked per actor call

    def __post_init__(self) -> None:
        for name in ("chunk", "queries_per_task"):
            if getattr(self, name) < 1:
                raise UserError(f"ray option {name}={getattr(self, name)} must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--ray-workers {self.workers} must be >= 1")


def connect(address: str | None = None) -> None:
    """Join (``auto``, ``ray://...``) or start (None) a Ray cluster, once per process."""
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(
                f"cannot reach a Ray cluster at {address!r} ({err}); start one with `ray start "
                "--head` or drop --address to run on this machine"
            ) from None


def _gpus_per_worker(device: str) -> int:
    """1 when actors should hold a GPU: asked for, or ``auto`` on a cluster that has GPUs."""
    if device == "cpu":
        return 0
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if device.startswith("cuda") and not has_gpus:
        raise UserError(f"device {device!r} asked for but the Ray cluster has no GPU; use cpu")
    return int(has_gpus)


def _workers(options: RayOptions, gpus: int) -> int:
    if options.workers:
        return options.workers
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1


def _on_actors(
    rows: list[dict],
    blocks: int,
    actor: type,
    kwargs: dict,
    batch_size: int,
    options: RayOptions,
    gpus: int,
) -> list[dict]:
    """``rows`` through a pool of ``actor(**kwargs, threads=...)`` in batches of ``batch_size``;
    a dead actor is restarted and its batch run again."""
    return (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map_batches(
            actor,
            fn_constructor_kwargs={**kwargs, "threads": int(options.cpus_per_worker)},
            batch_size=batch_size,
            concurrency=_workers(options, gpus),
            num_cpus=options.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=-1,
            max_task_retries=-1,
        )
        .take_all()
    )


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
class _ExtractChunks:
    """Ray Data actor: one extractor, whole chunks into their own shard folders."""

    def __init__(self, config: ExtractorConfig, root: str, attrs: dict, threads: int):
        torch.set_num_threads(max(1, threads))
        self.config, self.root, self.attrs = config, Path(root), attrs
        self.extractor = build_extractor(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done, resumed = [], []
        for chunk, payload in zip(batch["chunk"], batch["items"]):
            items = [Item(n, Path(p), tuple(b) if b else None) for n, p, b in json.loads(payload)]
            report = extract(
                self.extractor,
                items,
                self.root / f"{int(chunk):06d}",
                batch_size=self.config.batch_size,
                num_workers=self.config.num_workers,
                store_dtype=self.config.store_dtype,
                attrs=self.attrs,
            )
            done.append(report.done)
            resumed.append(report.resumed)
        return {"chunk": batch["chunk"], "done": np.array(done), "resumed": np.array(resumed)}


def _finished(folder: Path, items: Sequence[Item]) -> bool:
    """Every image of the chunk is stored or was skipped as unreadable by an earlier run."""
    if not (folder / LOCAL_FILE).is_file():
        return False
    with LocalStore(folder / LOCAL_FILE) as store:
        known = set(store.names or [])
    if (folder / SKIPPED_FILE).is_file():
        known |= {line.split("\t")[0] for line in (folder / SKIPPED_FILE).read_text().splitlines()}
    return all(it.name in known for it in items)


def extract_on_ray(
    config: ExtractorConfig,
    items: Sequence[Item],
    out: Path,
    options: RayOptions = RayOptions(),
    attrs: dict | None = None,
) -> ExtractReport:
    """Extract ``items`` into the extraction folder ``out`` on a Ray cluster (module docstring).

    Rerunning the same call resumes: finished chunks are not sent again, unfinished ones continue
    where their shard stopped. ``out/shards`` must stay beside the joined store (it maps them).
    """
    out = Path(out)
    root = out / SHARDS
    chunks = [list(items[i : i + options.chunk]) for i in range(0, len(items), options.chunk)]
    todo = [k for k, chunk in enumerate(chunks) if not _finished(root / f"{k:06d}", chunk)]
    logger.info("%d images in %d chunks, %d to extract", len(items), len(chunks), len(todo))
    done = 0
    if todo:
        connect(options.address)
        gpus = _gpus_per_worker(config.device)
        rows = [
            {
                "chunk": k,
                "items": json.dumps([[it.name, str(it.path), it.box] for it in chunks[k]]),
            }
            for k in todo
        ]
        actor = {"config": config, "root": str(root), "attrs": attrs or {}}
        stats = _on_actors(rows, len(rows), _ExtractChunks, actor, 1, options, gpus)
        done = sum(int(s["done"]) for s in stats)
    report = join_extractions([root / f"{k:06d}" for k in range(len(chunks))], out)
    skipped = [
        (name, reason)
        for line in (out / SKIPPED_FILE).read_text().splitlines()
        for name, _, reason in [line.partition("\t")]
    ]
    return ExtractReport(len(items), done, report.images - done, skipped)


# ----------------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------------
def index_database(index: Path) -> Database:
    """The database of an index folder: the opener ``locore rerank --ray`` gives its actors."""
    return open_index(Path(index)).database


class _RerankBlocks:
    """Ray Data actor: opens the database once (``open_database()``, a picklable callable), builds
    the chain once, and runs it on blocks of queries, returning every stage's result."""

    def __init__(
        self,
        open_database: Callable[[], Database],
        stages: Sequence[StageConfig | tuple],
        threads: int,
    ):
        torch.set_num_threads(max(1, threads))
        self.database = open_database()
        self.chain = build_chain(stages)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        local = batch.get("local")
        junk = [set(json.loads(j)) for j in batch["junk"]] if "junk" in batch else None
        queries = Queries(
            np.stack(batch["global"]), None if local is None else np.stack(local), junk
        )
        shortlist = Shortlist(np.stack(batch["ids"]), np.stack(batch["sims"]))
        _, results = self.chain.run(queries, shortlist, self.database)
        out = {"row": batch["row"]}
        for i, result in enumerate(results):
            out[f"ids{i}"], out[f"scores{i}"] = result.ids, result.scores
            out[f"before{i}"] = result.before
        return out


def rerank_on_ray(
    open_database: Callable[[], Database],
    stages: Sequence[StageConfig | tuple],
    queries: Queries,
    shortlist: Shortlist,
    options: RayOptions = RayOptions(),
) -> tuple[RerankResult, list[RerankResult]]:
    """Run the chain ``stages`` on ``shortlist`` ``[Q, M]`` over Ray actors, each opening the
    database with ``open_database`` (e.g. ``functools.partial(index_database, path)``).

    Returns what :meth:`locore.rerank.chain.Chain.run` returns in one process: the final result
    and every stage's own, in query order.
    """
    connect(options.address)
    gpus = _gpus_per_worker("auto")
    rows = []
    for q in range(len(queries)):
        row = {
            "row": q,
            "global": np.asarray(queries.global_desc[q], np.float32),
            "ids": np.asarray(shortlist.ids[q], np.int64),
            "sims": np.asarray(shortlist.sims[q], np.float32),
        }
        if queries.local_rows is not None:
            row["local"] = np.asarray(queries.local_rows[q], np.float32)
        if queries.junk is not None:
            row["junk"] = json.dumps(sorted(int(i) for i in queries.junk[q]))
        rows.append(row)
    blocks = max(1, -(-len(rows) // options.queries_per_task))
    actor = {"open_database": open_database, "stages": tuple(stages)}
    parts = _on_actors(rows, blocks, _RerankBlocks, actor, options.queries_per_task, options, gpus)
    parts.sort(key=lambda r: int(r["row"]))
    results = [
        RerankResult(
            np.stack([p[f"ids{i}"] for p in parts]),
            np.stack([p[f"scores{i}"] for p in parts]),
            np.stack([p[f"before{i}"] for p in parts]),
        )
        for i in range(len(stages))
    ]
    last = results[-1]
    return RerankResult(last.ids, last.scores, np.asarray(shortlist.ids)), results
