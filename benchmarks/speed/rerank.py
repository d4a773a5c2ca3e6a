"""Latency and peak memory of one LoCoRe forward per 100-image list, ``hf`` vs ``fast`` backend.

Random weights of a preset and random descriptors (48 locals + global per image, ~10 % padded
locals, the official 5,050-token layout); no checkpoint and no data are needed. Every
(variant, dtype, batch, backend) setting runs in a fresh process so that peak memory is its own:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed calls (weights and inputs included);
* CPU: growth of the process's peak RSS during the timed calls over its RSS before them
  (activations and workspace only; weights and inputs excluded).

Latency is the median of the timed calls divided by the batch (milliseconds per list).

Usage (wired as ``locore bench rerank`` by the CLI, or directly):
    python -m locore.benchmarks.speed.rerank --variant tiny --backend both --dtype fp32 --batch 1 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import platform
import queue as queue_module
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from locore.core.device import resolve_device
from locore.rerank.locore import LocoreInputs, build_model

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("micro", "tiny", "small", "base", "base_cvnet")
RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclasses.dataclass
class Setting:
    """One measured configuration."""

    variant: str
    backend: str
    dtype: str
    batch: int
    gallery: int = 100
    num_local: int = 48
    device: str = "cpu"
    threads: int | None = None
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    seed: int = 0


@dataclasses.dataclass
class Result:
    """Milliseconds per list (median and best of ``repeats``) and peak MiB of one setting."""

    setting: Setting
    ms_per_list: float
    best_ms_per_list: float
    peak_mib: float
    tokens: int
    device_name: str


def random_inputs(config, batch: int, gallery: int, n: int, device: torch.device, seed: int):
    """Random descriptors in the official layout with ~10 % padded locals."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    return LocoreInputs(
        query_local=randn(batch, n, config.local_dim),
        query_scales=torch.zeros(batch, n, dtype=torch.long, device=device),
        query_mask=(torch.rand(batch, n, generator=gen) < 0.1).to(device),
        gallery_local=randn(batch, gallery, n, config.local_dim),
        gallery_scales=torch.zeros(batch, gallery, n, dtype=torch.long, device=device),
        gallery_mask=(torch.rand(batch, gallery, n, generator=gen) < 0.1).to(device),
        query_global=randn(batch, config.global_dim),
        gallery_global=randn(batch, gallery, config.global_dim),
    )


def measure(setting: Setting) -> Result:
    """Time ``setting`` in this process (call it in a fresh one for a clean memory peak)."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    device = torch.device(setting.device)
    cuda = device.type == "cuda"
    torch.manual_seed(setting.seed)
    model = build_model(setting.variant, backend=setting.backend)
    model = model.to(device=device, dtype=DTYPES[setting.dtype]).eval()
    inputs = random_inputs(
        model.config, setting.batch, setting.gallery, setting.num_local, device, setting.seed
    )
    forward = torch.compile(model) if setting.compile else model

    def call() -> None:
        forward(inputs)
        if cuda:
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(setting.warmup):
            call()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _rss_mib()
        times = []
        for _ in range(setting.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        name = torch.cuda.get_device_name(device)
    else:
        peak = _peak_rss_mib() - rss_before
        name = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    tokens = (1 + setting.gallery) * (setting.num_local + 2)
    return Result(
        setting=setting,
        ms_per_list=1000 * statistics.median(times) / setting.batch,
        best_ms_per_list=1000 * min(times) / setting.batch,
        peak_mib=peak,
        tokens=tokens,
        device_name=name,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(setting: Setting, queue) -> None:
    try:
        queue.put(measure(setting))
    except Exception as err:  # report to the parent, which names the setting
        queue.put(f"{type(err).__name__}: {err}")


def measure_isolated(setting: Setting) -> Result | str:
    """:func:`measure` in a fresh spawned process; a string describes a failure (e.g. OOM)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(setting, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():  # killed (e.g. out of memory) before reporting
                result = f"worker exited with code {proc.exitcode}"
                break
    proc.join()
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench rerank``."""
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=["tiny"])
    parser.add_argument("--backend", choices=["hf", "fast", "both"], default="both")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="lists per forward")
    parser.add_argument("--gallery", type=int, default=100, help="gallery images per list")
    parser.add_argument("--num-local", type=int, default=48, help="local descriptors per image")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast backend")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")


def run(args: argparse.Namespace) -> int:
    """Measure every setting, print a side-by-side markdown table and write the JSON rows."""
    device = str(resolve_device(args.device))
    backends = ["hf", "fast"] if args.backend == "both" else [args.backend]
    settings = [
        Setting(
            variant=variant,
            backend=backend,
            dtype=dtype,
            batch=batch,
            gallery=args.gallery,
            num_local=args.num_local,
            device=device,
            threads=args.threads,
            compile=args.compile and backend == "fast",
            warmup=args.warmup,
            repeats=args.repeats,
        )
        for variant in args.variant
        for dtype in args.dtype
        for batch in args.batch
        for backend in backends
    ]
    results = {}
    for setting in tqdm(settings, desc="locore bench rerank", unit="setting"):
        results[_key(setting)] = measure_isolated(setting)
    rows = _table(settings, results, backends)
    print("\n".join(rows))
    out = args.out or RESULTS / f"locore_rerank_{device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            [
                {"error": r, **dataclasses.asdict(s)}
                if isinstance(r := results[_key(s)], str)
                else dataclasses.asdict(r)
                for s in settings
            ],
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


def _key(setting: Setting) -> tuple:
    return setting.variant, setting.dtype, setting.batch, setting.backend


def _table(settings: list[Setting], results: dict, backends: list[str]) -> list[str]:
    def cell(r: Result | str | None, what: str) -> str:
        if r is None:
            return "-"
        if isinstance(r, str):
            return "failed"
        return f"{r.ms_per_list:.1f}" if what == "ms" else f"{r.peak_mib:.0f}"

    head = ["variant", "dtype", "batch"]
    head += [f"{b} ms/list" for b in backends] + [f"{b} peak MiB" for b in backends]
    if len(backends) == 2:
        head.append("hf / fast")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for s in settings:
        key = (s.variant, s.dtype, s.batch)
        if key in seen:
            continue
        seen.add(key)
        found = {b: results.get((*key, b)) for b in backends}
        row = [s.variant, s.dtype, str(s.batch)]
        row += [cell(found[b], "ms") for b in backends]
        row += [cell(found[b], "mem") for b in backends]
        if len(backends) == 2:
            hf, fast = found["hf"], found["fast"]
            ok = isinstance(hf, Result) and isinstance(fast, Result)
            row.append(f"{hf.ms_per_list / fast.ms_per_list:.1f}x" if ok else "-")
        rows.append("| " + " | ".join(row) + " |")
    for s in settings:
        if isinstance(r := results[_key(s)], str):
            rows.append(f"failed {_key(s)}: {r}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m locore.benchmarks.speed.rerank``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
