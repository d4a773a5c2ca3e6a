"""``locore bench gpu``: the GPU measurements of issue #19 in one process, one JSON, one table.

Sections, in the order they run (random weights everywhere: nothing is downloaded or read):

* ``locore``: one LoCoRe forward per 100-image list (5,050 tokens), ``fast`` vs ``hf`` backend,
  variants x dtypes x batches: milliseconds per list and memory.
* ``parity``: ``fast`` vs ``hf`` max abs token-logit difference, per variant and dtype.
* ``train``: one optimiser step of LoCoRe-base (batch 8, bf16 autocast, ``fast``), gradient
  checkpointing off and on: lists/s and memory.
* ``extract``: DINOv2 ViT-B/14-reg + detector at 770 px in bf16, batch 64 and 16: images/s end to
  end from JPEG files on disk (:func:`locore.engine.extract.extract`: decode, resize, forward,
  detector, top-K, store writes) and from tensors already on the device.
* ``sliding``: LoCoRe-base sliding re-ranking 400/100/50 of 70 queries end to end (HDF5 store
  gathers, model, fusion): milliseconds per query.
* ``global``: the training-free global-only stages, SuperGlobal and diffusion (diffusion solves
  in float64), re-ranking 400 shortlisted 768-D descriptors for 1 and 70 queries: milliseconds
  per query of the batched compute alone and of the stage end to end (gathers, re-sort).
* ``search``: 1M x 768 exact top-400 with the ``torch`` global index on the device: ms per query
  at 1 and 70 queries.
* ``compile``: the ``fast`` forward rows again under ``torch.compile`` (last: compiling is the
  slowest step and the likeliest to fail). ``hf`` is not compiled: its host syncs break graphs.

Every row runs under try/except, so a failing row (an out-of-memory, ``torch.compile`` missing a
compiler) records its error and the suite goes on; a row starts only while its section has time
left, else it is recorded as skipped. The JSON is rewritten atomically after every row, so a run
killed by a timeout still leaves its data. GPU times come from CUDA events, CPU times from
``perf_counter``. Where a target of the issue is missed, the row carries a torch-profiler table of
the ops that took the time (and the device-busy vs wall time of that call).

Memory columns: ``peak_mib`` is the most memory allocated during the timed calls (CUDA; the
resident set on a CPU), everything live included (weights, inputs, optimiser state), and
``work_mib`` its growth over what was allocated before them (activations, workspace).

On a machine where the package is not installed (a copied checkout), make the repository root
importable as ``locore`` (it *is* the package) and run the module, from the repository root:

    T=$(mktemp -d) && ln -s "$PWD" "$T/locore" && \
        PYTHONPATH="$T" python3 -m locore.benchmarks.speed.gpu --out runs/gpu_bench

``--smoke`` runs every section at toy sizes in seconds (the CPU test runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from locore.benchmarks.speed.extract import synthetic_photo, time_jpeg, time_tensors
from locore.benchmarks.speed.index import rss_mib
from locore.benchmarks.speed.latency import PeakMemory, random_store
from locore.benchmarks.speed.rerank import DTYPES, random_inputs
from locore.benchmarks.superglobal_latency import calls as global_calls
from locore.core import atomic
from locore.core.device import autocast, resolve_device
from locore.feature_extractors.registry import EXTRACTORS
from locore.indexing.global_index import GlobalIndex
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Database, Queries
from locore.rerank.locore import LocoreConfig, LocoreInputs, LocoreModel, build_model
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker
from locore.rerank.train.loop import TrainConfig, enable_gradient_checkpointing

logger = logging.getLogger(__name__)

JSON_FILE, MD_FILE = "gpu_bench.json", "gpu_bench.md"
SECTIONS = ("locore", "parity", "train", "extract", "sliding", "global", "search", "compile")
PLURAL = {"list": "lists", "query": "queries"}
AUTOCAST_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # LocoreOptions'


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes, repeats and time budgets of one run (defaults: the issue's GPU settings)."""

    variants: tuple[str, ...] = ("base", "small", "tiny")  # LoCoRe presets; the first is the target
    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")  # model dtypes; bf16 carries the targets
    batches: tuple[int, ...] = (8, 1, 32)  # lists per forward; the first is the target batch
    gallery: int = 100  # images per list: (1 + 100) x (48 + 2) = 5,050 tokens
    num_local: int = 48  # local descriptors per image
    parity_batch: int = 2  # lists compared between the backends
    warmup: int = 1  # untimed calls per row (lazy builds, allocator growth, cuBLAS choices)
    repeats: int = 10  # timed calls per row at most ...
    row_seconds: float = 2.0  # ... stopping once this much was timed (after at least 2 calls)
    compile_backend: str = "inductor"  # torch.compile backend
    # dtypes of the compiled rows (every variant and batch)
    compile_dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    compile_min_left: float = 60.0  # seconds a compile row needs left to start
    train_batch: int = 8  # lists per training step (LoCoRe-base = variants[0])
    extractor: str = "dinov2_vitb14_reg"
    extractor_options: dict = dataclasses.field(
        default_factory=lambda: {"weights": "random", "detector": "random", "imsize": 770}
    )
    extract_batches: tuple[int, ...] = (64, 16)  # the first is the target batch
    extract_count: int = 512  # timed images per extraction row
    extract_workers: int | None = None  # DataLoader decode workers; None = CPUs - 2, at most 16
    sliding: tuple[int, int, int] = (400, 100, 50)  # K re-ranked, window W, stride S
    sliding_queries: int = 70
    sliding_settings: tuple[tuple[str, int], ...] = (("bf16", 8), ("fp32", 8), ("bf16", 32))
    sliding_repeats: int = 3  # timed full runs (after a one-query warm-up)
    store_images: int = 1000  # images in the local store the shortlists point into
    global_stages: tuple[str, ...] = ("superglobal", "diffusion")
    global_m: int = 400  # shortlist entries each global-only stage re-ranks
    global_dim: int = 768  # DINOv2 ViT-B's global descriptor
    global_queries: tuple[int, ...] = (1, 70)  # queries per call
    global_database: int = 20_000  # random unit vectors the shortlists point into
    search_n: int = 1_000_000
    search_dim: int = 768
    search_k: int = 400
    search_queries: tuple[int, ...] = (1, 70)  # queries per search call
    budgets: dict = dataclasses.field(  # seconds per section (compile: whatever is left)
        default_factory=lambda: {
            "locore": 150,
            "parity": 20,
            "train": 40,
            "extract": 60,
            "sliding": 45,
            "global": 15,
            "search": 35,
            "compile": 600,
        }
    )
    total_seconds: float = 420.0  # the whole run (the issue allows 8 minutes: startup, grace)
    grace_seconds: float = 20.0  # a row may overrun its section's budget by this much
    smoke: bool = False

    def workers(self) -> int:
        """Decode workers of the JPEG rows."""
        if self.extract_workers is not None:
            return self.extract_workers
        return max(1, min(16, (os.cpu_count() or 2) - 2))


# Toy sizes of every section: seconds on a CPU, same code paths (compile traces without
# generating code, so no C++ compiler is needed).
SMOKE = Plan(
    variants=("micro",),
    dtypes=("fp32", "bf16"),
    batches=(2,),
    gallery=6,
    num_local=4,
    warmup=1,
    repeats=1,
    row_seconds=0.0,
    compile_backend="eager",
    compile_dtypes=("fp32",),
    compile_min_left=0.0,
    train_batch=2,
    extractor_options={
        "weights": "random",
        "detector": "random",
        "imsize": 42,
        "num_local": 8,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
    },
    extract_batches=(2,),
    extract_count=2,
    extract_workers=0,
    sliding=(10, 6, 4),
    sliding_queries=3,
    sliding_settings=(("bf16", 2),),
    sliding_repeats=1,
    store_images=12,
    global_m=16,
    global_dim=32,
    global_queries=(1, 3),
    global_database=200,
    search_n=2048,
    search_dim=32,
    search_k=16,
    search_queries=(1, 5),
    smoke=True,
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A number the issue asks for: ``metric`` of the tagged rows at most / at least ``bound``."""

    name: str
    metric: str
    bound: float
    higher_is_better: bool
    every_row: bool = False  # met only when every tagged row meets it (else: the best one)

    def met(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound


LOCORE_TARGET = Target("LoCoRe-base fast bf16, batch 8: ms per list", "ms_per_list", 3.0, False)
EXTRACT_TARGET = Target("extraction end to end (JPEG), bf16: images/s", "images_per_s", 600, True)
TRAIN_TARGET = Target("training LoCoRe-base, batch 8, bf16: lists/s", "lists_per_s", 40, True)
SEARCH_TARGET = Target("1M x 768 exact top-400: ms per query", "ms_per_query", 1.0, False, True)
TARGETS = (LOCORE_TARGET, EXTRACT_TARGET, TRAIN_TARGET, SEARCH_TARGET)
SPEEDUP = 10.0  # fast must beat hf by this factor at the LoCoRe target setting


@dataclasses.dataclass
class Task:
    """One row to measure: ``run()`` returns its metrics; ``profile()`` says where the time goes
    (asked only when the row misses its ``target``)."""

    params: dict  # what the row is (the first table columns)
    run: Callable[[], dict]
    target: Target | None = None
    profile: Callable[[], dict] | None = None
    min_left: float = 0.0  # seconds of section budget the row needs to start


@dataclasses.dataclass(frozen=True)
class Timing:
    """Timed calls of one row."""

    median_ms: float
    best_ms: float
    calls: int
    held_mib: float  # allocated before the timed calls (CUDA; resident set on a CPU)
    work_mib: float  # peak growth over ``held_mib`` during the timed calls


# ----------------------------------------------------------------------------------------------
# Timing, memory, profiles
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _held_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return rss_mib()


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU (the call's stream time, host gaps
    included), ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start_s)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, seconds: float
) -> Timing:
    """``warmup`` untimed calls, then up to ``repeats`` timed ones, stopping once ``seconds``
    were timed (at least two calls when ``repeats`` allows): long rows stay within budget."""
    for _ in range(warmup):
        fn()
    _sync(device)
    held = _held_mib(device)
    times: list[float] = []
    with PeakMemory(device) as peak:
        while len(times) < max(repeats, 1):
            times.append(timed_ms(fn, device))
            if len(times) >= min(2, repeats) and sum(times) >= 1000 * seconds:
                break
    return Timing(statistics.median(times), min(times), len(times), held, peak.mib)


def per_item(timing: Timing, items: int, unit: str) -> dict:
    """Row metrics of a timing whose calls each handle ``items`` of ``unit`` (list, query)."""
    return {
        f"ms_per_{unit}": timing.median_ms / items,
        f"best_ms_per_{unit}": timing.best_ms / items,
        f"{PLURAL[unit]}_per_s": 1000 * items / timing.median_ms,
        "calls": timing.calls,
        "peak_mib": timing.held_mib + timing.work_mib,
        "work_mib": timing.work_mib,
    }


def profile_top(fn: Callable[[], object], device: torch.device, top: int = 12) -> dict:
    """Where one call of ``fn`` spends its time: the ``top`` torch ops by self time (on a GPU the
    device time of the kernels each op launched, else CPU time), and wall vs busy milliseconds
    (busy << wall: the host, not the kernels, is the bottleneck)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    wall_ms = 1000 * (time.perf_counter() - start)
    # Host-side ops only: kernels also appear as entries of their own, counted twice otherwise.
    ops = [
        e for e in prof.key_averages() if e.device_type == DeviceType.CPU and getattr(e, attr) > 0
    ]
    busy = sum(getattr(e, attr) for e in ops) / 1000
    ops.sort(key=lambda e: getattr(e, attr), reverse=True)
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy,
        "ops": [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": getattr(e, attr) / 1000,
                "share": getattr(e, attr) / 1000 / max(busy, 1e-9),
            }
            for e in ops[:top]
        ],
    }


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` inside the block after ``seconds`` (a hung or endless compile);
    only in the main thread (signals), elsewhere the block is unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:
        raise TimeoutError(f"stopped after {seconds:.0f} s (section time budget)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# Sections: each yields its rows as tasks; heavy state is built by the first task that needs it
# ----------------------------------------------------------------------------------------------
def locore_model(variant: str, dtype: str, device: torch.device, **overrides) -> LocoreModel:
    """A preset with random weights (seed 0: the same for every dtype), built on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(variant, **overrides)
    return model.to(dtype=DTYPES[dtype])


def first_lists(inputs: LocoreInputs, batch: int) -> LocoreInputs:
    """The first ``batch`` lists of ``inputs`` (views, no copy)."""
    return dataclasses.replace(
        inputs,
        **{
            f.name: getattr(inputs, f.name)[:batch]
            for f in dataclasses.fields(inputs)
            if getattr(inputs, f.name) is not None
        },
    )


def list_inputs(plan: Plan, device: torch.device) -> Callable[[LocoreConfig], LocoreInputs]:
    """Random lists of the largest batch for a model config, made once per descriptor widths
    (every variant of a run shares them; smaller batches take the first lists)."""

    @functools.cache
    def by_widths(local_dim: int, global_dim: int) -> LocoreInputs:
        config = LocoreConfig(local_dim=local_dim, global_dim=global_dim)
        return random_inputs(config, max(plan.batches), plan.gallery, plan.num_local, device, 0)

    return lambda config: by_widths(config.local_dim, config.global_dim)


def _forward(
    model: Callable[[], LocoreModel],
    run_model: Callable[[], Callable],
    lists: Callable[[LocoreConfig], LocoreInputs],
    batch: int,
    backend: str,
) -> Callable[[], None]:
    """One inference call of ``run_model()`` (the model or its compiled form) on ``batch`` lists."""

    def call() -> None:
        with torch.inference_mode():
            run_model()(first_lists(lists(model().config), batch), backend=backend)

    return call


def locore_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """Forward latency per list of every variant, dtype, batch and backend."""
    lists = list_inputs(plan, device)
    for variant in plan.variants:
        for dtype in plan.dtypes:
            model = functools.cache(functools.partial(locore_model, variant, dtype, device))
            for batch in plan.batches:
                for backend in ("fast", "hf"):
                    call = _forward(model, model, lists, batch, backend)
                    target = (variant, dtype, batch, backend) == (
                        plan.variants[0],
                        "bf16",
                        plan.batches[0],
                        "fast",
                    )
                    yield Task(
                        {"variant": variant, "dtype": dtype, "batch": batch, "backend": backend},
                        functools.partial(_list_row, call, batch, plan, device),
                        LOCORE_TARGET if target else None,
                        functools.partial(profile_top, call, device),
                    )


def _list_row(call: Callable[[], None], batch: int, plan: Plan, device: torch.device) -> dict:
    timing = time_calls(call, device, plan.warmup, plan.repeats, plan.row_seconds)
    return per_item(timing, batch, "list")


def parity_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """``fast`` vs ``hf`` token logits on the same weights and lists, per variant and dtype."""
    for variant in plan.variants:
        for dtype in plan.dtypes:
            yield Task(
                {"variant": variant, "dtype": dtype, "lists": plan.parity_batch},
                functools.partial(logit_gap, variant, dtype, plan, device),
            )


def logit_gap(variant: str, dtype: str, plan: Plan, device: torch.device) -> dict:
    """Max abs difference of the two backends' token logits, next to the logits' own scale."""
    model = locore_model(variant, dtype, device)
    x = random_inputs(model.config, plan.parity_batch, plan.gallery, plan.num_local, device, 1)
    with torch.inference_mode():
        fast = model(x, backend="fast").token_logits
        hf = model(x, backend="hf").token_logits
    return {
        "max_abs_diff": (fast - hf).abs().max().item(),
        "max_abs_logit": hf.abs().max().item(),
    }


def train_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """A LoCoRe training step with gradient checkpointing off, then on."""
    for checkpointing in (False, True):
        step = functools.cache(functools.partial(train_step, plan, device, checkpointing))
        yield Task(
            {
                "variant": plan.variants[0],
                "batch": plan.train_batch,
                "dtype": "bf16",
                "backend": "fast",
                "checkpointing": checkpointing,
            },
            functools.partial(_train_row, step, plan, device),
            TRAIN_TARGET,
            lambda step=step: profile_top(step(), device),
        )


def train_step(plan: Plan, device: torch.device, checkpointing: bool) -> Callable[[], None]:
    """One optimiser step as :func:`locore.rerank.train.loop.train` takes it (its AdamW, bf16
    autocast, clipping and defaults; the host batch moved to the device each step), without its
    data pipeline, logs and checkpoint files."""
    config = TrainConfig()
    model = locore_model(plan.variants[0], "fp32", device, backend="fast").train()
    if checkpointing:
        enable_gradient_checkpointing(model, "fast")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    cpu = torch.device("cpu")
    host = random_inputs(model.config, plan.train_batch, plan.gallery, plan.num_local, cpu, 2)
    gen = torch.Generator().manual_seed(2)
    positives = torch.rand(plan.train_batch, plan.gallery, generator=gen)
    positives[:, 0] = 0  # every list holds a positive
    host.positive_mask = (positives < 0.1).long()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, torch.bfloat16):
            output = model(host.to(device))
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()

    return step


def _train_row(step: Callable[[], Callable[[], None]], plan: Plan, device: torch.device) -> dict:
    timing = time_calls(step(), device, plan.warmup, plan.repeats, plan.row_seconds)
    return per_item(timing, plan.train_batch, "list")


def extract_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """Extraction throughput end to end from JPEG files and from tensors, in bf16."""

    @functools.cache
    def extractor():
        options = {**plan.extractor_options, "dtype": "bf16", "device": str(device)}
        return EXTRACTORS.create(plan.extractor, **options)

    for batch in plan.extract_batches:
        for source in ("jpeg", "tensors"):
            params = {"model": plan.extractor, "dtype": "bf16", "source": source, "batch": batch}
            if source == "jpeg":
                params["workers"] = plan.workers()
            yield Task(
                params,
                functools.partial(_extract_row, extractor, source, batch, plan),
                EXTRACT_TARGET if source == "jpeg" else None,
                functools.partial(_profile_extract, extractor, batch, device),
            )


def _extract_row(extractor: Callable, source: str, batch: int, plan: Plan) -> dict:
    if source == "jpeg":
        images, seconds = time_jpeg(extractor(), batch, plan.extract_count, 1, plan.workers())
    else:
        images, seconds = time_tensors(extractor(), batch, plan.extract_count, 1)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def _profile_extract(extractor: Callable, batch: int, device: torch.device) -> dict:
    """The device side of extraction (forward, detector, top-K, copies) on one batch."""
    x = extractor().preprocess(synthetic_photo(0)).unsqueeze(0).repeat(batch, 1, 1, 1)
    x = x.to(device)
    return profile_top(lambda: extractor().extract_batch(x), device)


def sliding_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """End-to-end sliding re-ranking of ``sliding_queries`` queries against an HDF5 store."""
    topk, window, stride = plan.sliding
    data: dict = {}
    with tempfile.TemporaryDirectory(prefix="locore-gpu-bench-") as tmp:

        def setup() -> dict:
            if not data:
                data.update(sliding_data(plan, device, Path(tmp) / "local.h5"))
            return data

        try:
            for dtype, batch in plan.sliding_settings:
                yield Task(
                    {
                        "variant": plan.variants[0],
                        "dtype": dtype,
                        "batch": batch,
                        "K/W/S": f"{topk}/{window}/{stride}",
                        "queries": plan.sliding_queries,
                    },
                    functools.partial(_sliding_row, setup, dtype, batch, plan, device),
                )
        finally:
            if data:
                data["database"].store.close()


def sliding_data(plan: Plan, device: torch.device, path: Path) -> dict:
    """Model, store, globals, queries (the first store images) and random shortlists."""
    model = locore_model(plan.variants[0], "fp32", device, num_local=plan.num_local)
    rng = np.random.default_rng(0)
    store = random_store(
        path, rng, plan.store_images, plan.num_local, model.config.local_dim, "float16"
    )
    globals_ = unit_vectors(plan.store_images, model.config.global_dim, device, seed=3)
    q = plan.sliding_queries
    ids = np.stack([rng.permutation(plan.store_images)[: plan.sliding[0]] for _ in range(q)])
    sims = -np.sort(-rng.random(ids.shape, dtype=np.float32), axis=1)
    return {
        "model": model,
        "database": Database(globals_, store),
        "queries": Queries(globals_[:q], store.rows(np.arange(q), plan.num_local)),
        "shortlist": Shortlist(ids=ids, sims=sims),
    }


def _sliding_row(
    setup: Callable[[], dict], dtype: str, batch: int, plan: Plan, device: torch.device
) -> dict:
    data = setup()
    topk, window, stride = plan.sliding
    options = LocoreOptions(
        sliding="end-to-start",
        topk=topk,
        window=window,
        stride=stride,
        num_local=plan.num_local,
        batch_size=batch,
        dtype=AUTOCAST_NAMES[dtype],
    )
    stage = LocoreReranker(data["model"], options)
    queries, shortlist, database = data["queries"], data["shortlist"], data["database"]
    one = Queries(queries.global_desc[:1], queries.local_rows[:1])
    stage.rerank(one, Shortlist(shortlist.ids[:1], shortlist.sims[:1]), database)  # warm-up

    def call() -> None:
        stage.rerank(queries, shortlist, database)

    timing = time_calls(call, device, 0, plan.sliding_repeats, plan.row_seconds)
    return per_item(timing, len(queries), "query")


def global_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """SuperGlobal and diffusion (``benchmarks/superglobal_latency.py``'s settings), timed here."""
    for stage in plan.global_stages:
        for count in plan.global_queries:
            yield Task(
                {"stage": stage, "dim": plan.global_dim, "M": plan.global_m, "queries": count},
                functools.partial(_global_row, stage, count, plan, device),
            )


def _global_row(stage: str, count: int, plan: Plan, device: torch.device) -> dict:
    setting = global_calls(
        plan.global_dim, plan.global_m, stage, count, plan.global_database, device=str(device)
    )
    compute = time_calls(setting.compute, device, plan.warmup, plan.repeats, plan.row_seconds)
    whole = time_calls(setting.stage, device, plan.warmup, plan.repeats, plan.row_seconds)
    return {
        "dtype": setting.dtype,
        "compute_ms_per_query": compute.median_ms / count,
        **per_item(whole, count, "query"),
    }


def unit_vectors(n: int, dim: int, device: torch.device, seed: int) -> np.ndarray:
    """``[n, dim]`` float32 random unit rows, drawn on ``device`` (fast for 1M rows)."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, device=device)
    return torch.nn.functional.normalize(x, dim=1).cpu().numpy()


def search_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """Exact search with the ``torch`` index on the device, by queries per call."""
    state: dict = {}

    def setup() -> dict:
        if not state:
            index = GlobalIndex.build(plan.search_dim, "torch", device=str(device))
            index.add(unit_vectors(plan.search_n, plan.search_dim, device, seed=4))
            state["index"] = index
            state["queries"] = unit_vectors(max(plan.search_queries), plan.search_dim, device, 5)
        return state

    for count in plan.search_queries:

        def call(count: int = count) -> None:
            s = setup()
            s["index"].search(s["queries"][:count], plan.search_k)

        yield Task(
            {"n": plan.search_n, "dim": plan.search_dim, "k": plan.search_k, "queries": count},
            functools.partial(_search_row, call, count, plan, device),
            SEARCH_TARGET,
            functools.partial(profile_top, call, device),
        )


def _search_row(call: Callable[[], None], count: int, plan: Plan, device: torch.device) -> dict:
    timing = time_calls(call, device, plan.warmup, plan.repeats, plan.row_seconds)
    return per_item(timing, count, "query")


def compile_section(plan: Plan, device: torch.device) -> Iterator[Task]:
    """The ``fast`` forward rows under ``torch.compile``; ``first_call_s`` includes compiling."""
    lists = list_inputs(plan, device)
    try:
        for variant in plan.variants:
            for dtype in plan.compile_dtypes:
                # Every model compiles the same code objects: forget the previous model's graphs
                # so that dynamo's recompile limit never turns a "compiled" row into eager.
                torch._dynamo.reset()
                model = functools.cache(functools.partial(locore_model, variant, dtype, device))
                compiled = functools.cache(
                    lambda model=model: torch.compile(model(), backend=plan.compile_backend)
                )
                for batch in plan.batches:
                    call = _forward(model, compiled, lists, batch, "fast")
                    target = (variant, dtype, batch) == (plan.variants[0], "bf16", plan.batches[0])
                    yield Task(
                        {
                            "variant": variant,
                            "dtype": dtype,
                            "batch": batch,
                            "backend": f"fast, compiled ({plan.compile_backend})",
                        },
                        functools.partial(_compiled_row, call, batch, plan, device),
                        LOCORE_TARGET if target else None,
                        functools.partial(profile_top, call, device),
                        plan.compile_min_left,
                    )
    finally:
        torch._dynamo.reset()


def _compiled_row(call: Callable[[], None], batch: int, plan: Plan, device: torch.device) -> dict:
    start = time.perf_counter()
    call()  # compiles (or recompiles for a new batch size)
    _sync(device)
    first = time.perf_counter() - start
    return {"first_call_s": first, **_list_row(call, batch, plan, device)}


SECTION_FUNCTIONS: dict[str, Callable[[Plan, torch.device], Iterator[Task]]] = {
    "locore": locore_section,
    "parity": parity_section,
    "train": train_section,
    "extract": extract_section,
    "sliding": sliding_section,
    "global": global_section,
    "search": search_section,
    "compile": compile_section,
}


# ----------------------------------------------------------------------------------------------
# The run: budgets, incremental results, summary
# ----------------------------------------------------------------------------------------------
class Suite:
    """Runs sections within their budgets; the JSON and the table are rewritten after each row."""

    def __init__(self, out: Path, plan: Plan, device: torch.device, echo: Callable[[str], None]):
        self.out, self.plan, self.device, self.echo = Path(out), plan, device, echo
        self.started = time.monotonic()
        self.record: dict = {"setup": setup_info(plan, device), "rows": [], "finished": False}

    def run_section(self, name: str, tasks: Iterable[Task]) -> None:
        """Run ``tasks`` in order; each records metrics, an error or why it was skipped."""
        start = time.monotonic()
        end = min(start + self.plan.budgets[name], self.started + self.plan.total_seconds)
        iterator = iter(tasks)
        while True:
            try:
                task = next(iterator)
            except StopIteration:
                break
            except Exception as err:  # the section could not even produce its next row
                self._add({"section": name, "error": _describe(err)})
                break
            self._run_task(name, task, end)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run_task(self, section: str, task: Task, end: float) -> None:
        row: dict = {"section": section, **task.params}
        left = end - time.monotonic()
        if left <= 0 or left < task.min_left:
            row["skipped"] = f"{max(left, 0):.0f} s of the section budget left"
            self._add(row)
            return
        start = time.monotonic()
        try:
            with time_limit(left + self.plan.grace_seconds):
                row.update(task.run())
                missed = task.target is not None and not task.target.met(row[task.target.metric])
                if task.target is not None:
                    row["target"] = task.target.name
                if missed and task.profile is not None:
                    row["profile"] = _guarded(task.profile)
        except Exception as err:  # one failing row must not stop the suite
            row["error"] = _describe(err)
            logger.debug("row %s failed", row, exc_info=True)
        row["seconds"] = time.monotonic() - start
        self._add(row)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _add(self, row: dict) -> None:
        self.record["rows"].append(row)
        self.echo(_row_line(row))
        self.save()

    def finish(self) -> None:
        self.record["targets"] = summarise(self.record["rows"])
        self.record["seconds"] = time.monotonic() - self.started
        self.record["finished"] = True
        self.save()

    def save(self) -> None:
        """Both files, each atomically (a reader sees the old or the new one)."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.out / JSON_FILE, json.dumps(self.record, indent=1) + "\n")
        atomic.write_text(self.out / MD_FILE, markdown(self.record))


def _guarded(profile_call: Callable[[], dict]) -> dict:
    """A profile, or why there is none (the row's measurement stands either way)."""
    try:
        return profile_call()
    except Exception as err:
        return {"error": _describe(err)}


def _describe(err: BaseException) -> str:
    """Exception type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _row_line(row: dict) -> str:
    shown = {k: v for k, v in row.items() if k not in ("profile", "target")}
    return "  ".join(f"{k}={_cell(v)}" for k, v in shown.items())


def setup_info(plan: Plan, device: torch.device) -> dict:
    """Machine and library versions of the run."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "timm": version("timm"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "command": " ".join(sys.argv),
        "plan": dataclasses.asdict(plan),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Each target's best row, and ``fast`` vs ``hf`` at the LoCoRe target setting."""
    out = []
    for target in TARGETS:
        values = [r[target.metric] for r in rows if r.get("target") == target.name]
        best = target.higher_is_better != target.every_row  # max of the values
        out.append(_verdict(target, (max if best else min)(values, default=None)))
    fast = [r for r in rows if r.get("target") == LOCORE_TARGET.name and r["section"] == "locore"]
    if fast:
        keys = ("variant", "dtype", "batch")
        hf = [
            r
            for r in rows
            if r["section"] == "locore"
            and r.get("backend") == "hf"
            and "ms_per_list" in r
            and all(r[k] == fast[0][k] for k in keys)
        ]
        ratio = hf[0]["ms_per_list"] / fast[0]["ms_per_list"] if hf else None
        out.append(_verdict(Target("hf / fast at that setting", "x", SPEEDUP, True), ratio))
    extract = {
        source: max(
            (r["images_per_s"] for r in rows if r.get("source") == source and "images_per_s" in r),
            default=None,
        )
        for source in ("jpeg", "tensors")
    }
    if extract["jpeg"] is not None and extract["tensors"] is not None:
        verdict = next(v for v in out if v["target"] == EXTRACT_TARGET.name)
        verdict["note"] = f"from tensors {extract['tensors']:.0f} images/s: " + (
            "the forward keeps up; decode, resize and store writes (CPU) take the rest"
            if extract["tensors"] >= EXTRACT_TARGET.bound
            else "the forward alone is below the target (see its profile)"
        )
    return out


def _verdict(target: Target, value: float | None) -> dict:
    return {
        "target": target.name,
        "bound": target.bound,
        "higher_is_better": target.higher_is_better,
        "value": value,
        "met": None if value is None else target.met(value),
    }


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(record: dict) -> str:
    """The whole record as Markdown: setup, targets, one table per section, profiles."""
    setup, plan = record["setup"], record["setup"]["plan"]
    lines = [
        f"# locore bench gpu: {setup['device_name']}",
        "",
        f"torch {setup['torch']} (CUDA {setup['cuda']}), transformers {setup['transformers']}, "
        f"timm {setup['timm']}, Python {setup['python']}, {setup['cpus']} CPUs. "
        f"Command: `{setup['command']}`.",
        "",
        f"LoCoRe lists: query + {plan['gallery']} images x ({plan['num_local']} locals + GLOBAL "
        f"+ SEP) = {(1 + plan['gallery']) * (plan['num_local'] + 2):,} tokens; random weights.",
    ]
    if plan["smoke"]:
        lines += ["", "**Smoke run**: toy shapes; the targets do not apply to these numbers."]
    if not record["finished"]:
        lines += ["", "**Unfinished**: the run stopped before its last row."]
    if record.get("targets"):
        lines += ["", "## Targets", "", "| target | value | bound | met |", "|---|---|---|---|"]
        for t in record["targets"]:
            value = "-" if t["value"] is None else _cell(t["value"])
            sign = ">=" if t["higher_is_better"] else "<="
            met = "-" if t["met"] is None else _cell(t["met"])
            lines.append(f"| {t['target']} | {value} | {sign} {_cell(t['bound'])} | {met} |")
        lines += [f"- {t['target']}: {t['note']}" for t in record["targets"] if "note" in t]
    rows = record["rows"]
    for section in dict.fromkeys(r["section"] for r in rows):
        mine = [r for r in rows if r["section"] == section]
        done = [r for r in mine if "error" not in r and "skipped" not in r]
        lines += ["", f"## {section}", ""]
        if done:
            hidden = {"section", "profile", "target"}
            columns = [k for k in dict.fromkeys(k for r in done for k in r) if k not in hidden]
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in columns) + " |" for r in done]
        for r in mine:
            if "error" in r or "skipped" in r:
                quiet = ("section", "error", "skipped", "seconds")
                what = ", ".join(f"{k}={_cell(v)}" for k, v in r.items() if k not in quiet)
                status = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"- {what or section}: {status}")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        lines += ["", "## Where the time goes (rows that missed their target)"]
    for r in profiled:
        p = r["profile"]
        what = ", ".join(f"{k}={_cell(v)}" for k, v in r.items() if k in PROFILE_KEYS)
        lines += ["", f"### {r['section']}: {what}", ""]
        if "error" in p:
            lines.append(f"no profile: {p['error']}")
            continue
        lines += [
            f"one call: {p['wall_ms']:.2f} ms wall, {p['busy_ms']:.2f} ms busy (self time summed)",
            "",
            "| op | calls | self ms | share |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.3f} | {100 * o['share']:.1f} % |"
            for o in p["ops"]
        ]
    return "\n".join(lines) + "\n"


PROFILE_KEYS = ("variant", "dtype", "batch", "backend", "source", "checkpointing", "queries")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench gpu``."""
    parser.add_argument(
        "--out", type=Path, required=True, help=f"folder for {JSON_FILE} and {MD_FILE}"
    )
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:1 | cpu")
    parser.add_argument(
        "--smoke", action="store_true", help="toy shapes, 1-2 calls per row (the CPU test)"
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {Plan.total_seconds:.0f})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections, printing one line per row; the files are complete at the end."""
    device = resolve_device(args.device)
    plan = SMOKE if args.smoke else Plan()
    if args.budget is not None:
        plan = dataclasses.replace(plan, total_seconds=args.budget)
    suite = Suite(args.out, plan, device, lambda line: print(line, flush=True))
    for name in (s for s in SECTIONS if s in args.sections):
        suite.run_section(name, SECTION_FUNCTIONS[name](plan, device))
    suite.finish()
    for t in suite.record["targets"]:
        value, met = ("-", "-") if t["value"] is None else (_cell(t["value"]), _cell(t["met"]))
        print(f"target {t['target']}: {value} (met: {met})")
    print(f"wrote {args.out / JSON_FILE} and {args.out / MD_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m locore.benchmarks.speed.gpu`` (no CLI needed on a bare machine)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs CPU-feature probing
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
