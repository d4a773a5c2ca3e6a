"""``locore bench latency``: per-stage latency and peak memory of one query, end to end.

Stages (one query each, synthetic data, no download):

    extract         the configured extractor on one image (``--image-size``)
    search          exact flat index over ``--db`` random global descriptors, top ``--topk``
    gather          the local rows of ``--topk`` shortlisted images from an HDF5 local store
    locore window   one LoCoRe window of ``--window`` images (gather + model + fusion)
    locore sliding  the full sliding re-rank of ``--topk`` images (end-to-start windows)
    superglobal     SuperGlobal re-ranking of the ``--topk`` shortlist (next to LoCoRe's cost)

As in the paper's Section 4.3, re-ranking costs are also given per 100 re-ranked images. The
LoCoRe model has random weights of a preset (``--variant``): speed does not depend on weights.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the stage; on CPU the growth of
the resident set over its level before the stage, sampled every millisecond by a thread (so
memory already held, e.g. weights loaded before, is not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from locore.core.device import resolve_device
from locore.engine.config import load_pipeline
from locore.engine.pipeline import build_extractor
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStore, LocalStoreWriter
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.locore.model import build_model
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker
from locore.rerank.sliding import window_starts
from locore.rerank.superglobal import SuperGlobalReranker

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclasses.dataclass
class StageTiming:
    """One stage: median and best milliseconds over the repeats, peak MiB, images re-ranked."""

    stage: str
    detail: str
    median_ms: float
    best_ms: float
    peak_mib: float
    images: int | None = None  # re-ranked images (for the per-100 column)

    @property
    def per_100_ms(self) -> float | None:
        return None if not self.images else self.median_ms * 100.0 / self.images


class PeakMemory:
    """Peak memory growth of a block (context manager); ``mib`` after exit.

    CPU: the kernel's resident-set high-water mark (``VmHWM``), reset on entry through
    ``/proc/self/clear_refs``, so a peak freed inside the block is seen without sampling.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident set
        self.base = self._status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return
        self.mib = (self._status_kib("VmHWM") * 1024 - self.base) / 2**20


def time_stage(
    name: str,
    detail: str,
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    images: int | None = None,
) -> StageTiming:
    """Warm up once, then time ``repeats`` calls (synchronised on CUDA) under a peak monitor."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    with PeakMemory(device) as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(1000.0 * (time.perf_counter() - start))
    logger.info("%s: %.2f ms (median of %d)", name, statistics.median(times), repeats)
    return StageTiming(name, detail, statistics.median(times), min(times), peak.mib, images)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_store(path: Path, rng: np.random.Generator, n: int, k: int, dim: int, dtype: str):
    """An HDF5 local store of ``n`` random images written with the real writer (valid rows:
    scale 0, no padding, weights descending, so LoCoRe can read them)."""
    with LocalStoreWriter(path, num_local=k, dim=dim, dtype=dtype) as writer:
        for lo in range(0, n, 256):
            m = min(256, n - lo)
            rows = np.zeros((m, k, 5 + dim), np.float32)
            rows[..., 5:] = rng.standard_normal((m, k, dim))
            rows[..., 4] = np.linspace(1.0, 0.1, k)
            writer.append([f"img{lo + i}" for i in range(m)], rows)
    return LocalStore(path)


def measure(args: argparse.Namespace, extractor_config) -> tuple[list[StageTiming], dict]:
    """Every stage of one query; returns the timings and a description of the setup."""
    device = torch.device(resolve_device(args.device))
    rng = np.random.default_rng(0)
    timings = []

    extractor = build_extractor(dataclasses.replace(extractor_config, device=str(device)))
    h, w = args.image_size
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    timings.append(
        time_stage(
            "extract",
            f"{extractor_config.name}, {w}x{h} image",
            lambda: extractor.extract(image, None),
            device,
            args.repeats,
        )
    )
    local_dim, global_dim = extractor.local_dim, extractor.global_dim
    num_local = min(args.num_local, extractor.num_local)
    query = extractor.extract(image, None)

    db = _unit(rng, args.db, global_dim)
    index = GlobalIndex.build(global_dim, kind="flat")
    index.add(db)
    q = query.global_desc[None].astype(np.float32)
    timings.append(
        time_stage(
            "search",
            f"flat, {args.db:,} x {global_dim}-D, top {args.topk}",
            lambda: index.search(q, args.topk),
            device,
            args.repeats,
        )
    )
    sims, ids = index.search(q, args.topk)

    with tempfile.TemporaryDirectory() as tmp:
        n_store = max(args.store_images, args.topk)
        store = random_store(Path(tmp) / "local.h5", rng, n_store, num_local, local_dim, "float16")
        ids = ids % n_store
        timings.append(
            time_stage(
                "gather",
                f"{args.topk} images x {num_local} locals (HDF5 fp16)",
                lambda: store.gather(ids, num_local),
                device,
                args.repeats,
            )
        )
        database = Database(db[:n_store], store)
        queries = Queries(
            global_desc=q,
            local_rows=query.local.to_rows()[None, :num_local].astype(np.float32),
        )
        shortlist = Shortlist(ids=ids, sims=sims)
        torch.manual_seed(0)
        model = build_model(
            args.variant, local_dim=local_dim, global_dim=global_dim, num_local=num_local
        ).to(device)
        for label, sliding, topk in (
            ("locore window", None, args.window),
            ("locore sliding", "end-to-start", args.topk),
        ):
            options = LocoreOptions(
                sliding=sliding,
                topk=topk,
                window=args.window,
                stride=args.stride,
                num_local=num_local,
                dtype=args.dtype,
            )
            stage = LocoreReranker(model, options)

            windows = len(window_starts(sliding, topk, args.window, args.stride))
            timings.append(
                time_stage(
                    label,
                    f"{args.variant}, {topk} images, {windows} window(s) of {args.window}",
                    lambda stage=stage: stage.rerank(queries, shortlist, database),
                    device,
                    args.repeats,
                    images=topk,
                )
            )
        sg = SuperGlobalReranker(m=args.topk, device=str(device))
        timings.append(
            time_stage(
                "superglobal",
                f"m={args.topk}, k=9, {global_dim}-D",
                lambda: sg.rerank(queries, shortlist, database),
                device,
                args.repeats,
                images=args.topk,
            )
        )
        store.close()
    setup = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "extractor": extractor_config.name,
        "variant": args.variant,
        "dtype": args.dtype,
        "db": args.db,
        "topk": args.topk,
        "window": args.window,
        "stride": args.stride,
        "num_local": num_local,
        "repeats": args.repeats,
    }
    return timings, setup


def format_table(timings: list[StageTiming], setup: dict) -> str:
    """Aligned text table; the per-100 column follows the paper's Section 4.3."""
    lines = [
        f"one query on {setup['device']} ({setup['threads']} threads), torch {setup['torch']}",
        f"{'stage':<16}{'median ms':>11}{'best ms':>10}{'ms/100 img':>12}{'peak MiB':>10}  detail",
    ]
    for t in timings:
        per = f"{t.per_100_ms:12.2f}" if t.per_100_ms is not None else f"{'':>12}"
        lines.append(
            f"{t.stage:<16}{t.median_ms:11.2f}{t.best_ms:10.2f}{per}{t.peak_mib:10.1f}  {t.detail}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench latency`` (``--config``/``--set`` choose the extractor)."""
    p = parser
    p.add_argument("--variant", default="base", help="LoCoRe preset (micro, tiny, small, base)")
    p.add_argument("--dtype", default="float32", help="LoCoRe autocast dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--db", type=int, default=100_000, help="global descriptors searched")
    p.add_argument("--store-images", type=int, default=1000, help="images in the local store")
    p.add_argument("--topk", type=int, default=400, help="shortlist re-ranked (K)")
    p.add_argument("--window", type=int, default=100, help="LoCoRe window (W)")
    p.add_argument("--stride", type=int, default=50, help="window stride (S)")
    p.add_argument("--num-local", type=int, default=48, help="local descriptors per image")
    p.add_argument(
        "--image-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"),
        help="extraction image size",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed calls per stage")
    p.add_argument(
        "--json", type=Path, default=None, help="result file (default benchmarks/results)"
    )


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and write the JSON."""

    config = load_pipeline(args.config, args.overrides)
    timings, setup = measure(args, config.extractor)
    table = format_table(timings, setup)
    print(table)
    device = "gpu" if setup["device"] != "cpu" else "cpu"
    path = args.json or RESULTS / f"latency_{device}_{setup['variant']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "setup": setup,
        "stages": [{**dataclasses.asdict(t), "per_100_ms": t.per_100_ms} for t in timings],
    }
    path.write_text(json.dumps(record, indent=1))
    print(f"\nwritten {path}")
    return 0
