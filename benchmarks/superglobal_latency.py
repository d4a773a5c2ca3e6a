"""Per-query latency of the global-only re-ranking stages, SuperGlobal and diffusion (M
shortlisted descriptors of D dimensions).

Two numbers per setting: ``compute`` (the batched matrix work,
:func:`rerank.superglobal.superglobal_scores` or :func:`rerank.diffusion.diffusion_scores`, on
descriptors already on the device) and ``stage`` (the stage's ``rerank`` end to end: gathering
the shortlisted rows from a database array, the compute, and the re-sort), each divided by the
number of queries in the batch. Diffusion always solves in float64 (``--dtype`` is SuperGlobal's).

Usage (wired as ``locore bench superglobal`` by the CLI, or directly):
    python -m locore.benchmarks.superglobal_latency --dims 2048 768 --queries 1 70
    python -m locore.benchmarks.superglobal_latency --stage diffusion --m 100 400
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from locore.core.device import resolve_device
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.diffusion import DiffusionReranker, diffusion_scores
from locore.rerank.superglobal import SuperGlobalReranker, superglobal_scores

STAGES = ("superglobal", "diffusion")


@dataclasses.dataclass
class Timing:
    """Per-query milliseconds of one setting: best and median of the repeats.

    On a shared machine the best run is the closest to the method's own cost; the median shows
    what a loaded machine gives.
    """

    stage: str
    dim: int
    m: int
    queries: int
    dtype: str
    device: str
    compute_ms: tuple[float, float]
    stage_ms: tuple[float, float]


def _best_median_ms(
    fn: Callable[[], object], repeats: int, sync: Callable[[], None], per: int
) -> tuple[float, float]:
    fn()  # warm-up: allocator, kernels, thread pool
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times) / per, 1000.0 * float(np.median(times)) / per


@dataclasses.dataclass(frozen=True)
class Calls:
    """One setting and its two timed calls, on random data already in place."""

    stage_name: str
    dim: int
    m: int
    queries: int
    dtype: str  # the dtype the compute runs in
    device: torch.device
    compute: Callable[[], object]  # the batched matrix work, descriptors on the device
    stage: Callable[[], object]  # the stage's ``rerank`` end to end


def calls(
    dim: int,
    m: int = 400,
    stage_name: str = "superglobal",
    queries: int = 1,
    database: int = 20_000,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
) -> Calls:
    """``stage_name`` for ``queries`` random queries with ``m``-long shortlists of ``dim``-D
    descriptors drawn from a ``database`` of random unit vectors."""
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((database, dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.integers(0, database, queries)]
    ids = np.stack([rng.choice(database, m, replace=False) for _ in range(queries)])
    sims = np.sort(np.einsum("qd,qmd->qm", q, db[ids]), axis=1)[:, ::-1]  # a sorted ranking
    shortlist = Shortlist(ids=ids.astype(np.int64), sims=np.ascontiguousarray(sims))
    batch = max(queries, 1)
    dtype = "float64" if stage_name == "diffusion" else dtype  # diffusion always solves in float64
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    q_t = torch.as_tensor(q, device=dev, dtype=torch_dtype)
    x_t = torch.as_tensor(db[ids], device=dev, dtype=torch_dtype)
    if stage_name == "diffusion":
        stage = DiffusionReranker(m=m, device=str(dev), batch_size=batch)
        seeds = torch.zeros(queries, m, dtype=torch_dtype, device=dev)
        seeds[:, : stage.seeds] = 1.0
        valid = torch.ones(queries, m, dtype=torch.bool, device=dev)

        @torch.inference_mode()
        def compute() -> object:
            return diffusion_scores(x_t, seeds, valid, stage.k, stage.gamma, stage.alpha)
    else:
        stage = SuperGlobalReranker(m=m, device=str(dev), dtype=dtype, batch_size=batch)

        @torch.inference_mode()
        def compute() -> object:
            return superglobal_scores(q_t, x_t)

    def whole() -> object:
        return stage.rerank(Queries(q), shortlist, Database(db))

    return Calls(stage_name, dim, m, queries, dtype, dev, compute, whole)


def measure(setting: Calls, repeats: int = 10) -> Timing:
    """Best and median of ``repeats`` runs of both calls of ``setting`` (after a warm-up)."""

    def sync() -> None:
        if setting.device.type == "cuda":
            torch.cuda.synchronize(setting.device)

    return Timing(
        setting.stage_name,
        setting.dim,
        setting.m,
        setting.queries,
        setting.dtype,
        str(setting.device),
        _best_median_ms(setting.compute, repeats, sync, setting.queries),
        _best_median_ms(setting.stage, repeats, sync, setting.queries),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench superglobal``."""
    parser.add_argument("--stage", choices=STAGES, default="superglobal", help="which stage")
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 768])
    parser.add_argument(
        "--m", type=int, nargs="+", default=[400], help="shortlist lengths re-ranked"
    )
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 70], help="batch sizes")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")


def run(args: argparse.Namespace) -> int:
    """Measure every (dim, m, queries) setting and print a markdown table."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = [
        measure(calls(dim, m, args.stage, n, dtype=args.dtype, device=args.device), args.repeats)
        for dim in args.dims
        for m in args.m
        for n in args.queries
    ]
    print(
        "| stage | D | M | queries per batch | dtype | device | compute ms/query best (median) "
        "| stage ms/query best (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.stage} | {r.dim} | {r.m} | {r.queries} | {r.dtype} | {r.device} | "
            f"{r.compute_ms[0]:.2f} ({r.compute_ms[1]:.2f}) | "
            f"{r.stage_ms[0]:.2f} ({r.stage_ms[1]:.2f}) |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dataclasses.asdict(r) for r in rows], fh, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m locore.benchmarks.superglobal_latency``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
