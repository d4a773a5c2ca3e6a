"""``locore bench scale``: the real ROxf+1M command on a synthetic release of N distractors.

For each ``--n``: write (or reuse) a synthetic AMES release of that size
(:mod:`locore.benchmarks.datasets.synthetic_release`) and a seeded LoCoRe-micro checkpoint, then
run, in a child process and from a fresh output folder::

    python -m locore bench revisitop --dataset roxford5k --with-1m --from-official RELEASE
        --superglobal --checkpoint MICRO --topk 400 --window 50 --stride 25 ...

while sampling the child from ``/proc`` (Linux): per stage wall time, peak RSS and bytes read.
Stages are cut where the child logs ``stage <name>: running`` and where its
``<name>.done.json`` marker appears; the peak RSS of each stage is measured by resetting the
child's high-water mark at every cut (``/proc/<pid>/clear_refs``), so the whole run's peak is
the largest of them (``wait4`` then reports the last stretch only). One JSON record per N goes
to ``OUT/scale.jsonl``; ``OUT/scale.md`` and ``OUT/scale.png`` (log-log time and memory against
N) are redrawn from all records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from locore.benchmarks.datasets.synthetic_release import (
    ReleaseSpec,
    generate,
    is_complete,
    release_bytes,
)
from locore.core.atomic import atomic_open, write_text
from locore.rerank.locore import build_model

SAMPLE_S = 0.2  # /proc sampling period
STAGE_LINE = re.compile(r"stage (\S+): (running|reusing)")
MB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench scale``."""
    p = parser
    p.add_argument(
        "--n",
        default="10000",
        help="distractor counts, comma-separated (e.g. 10000,100000,1000000)",
    )
    p.add_argument("--out", type=Path, required=True, help="releases, runs and the report")
    p.add_argument("--dim", type=int, default=64, help="descriptor size D (local and global)")
    p.add_argument("--num-local", type=int, default=48, help="local descriptors per image K")
    p.add_argument(
        "--nn-depth",
        type=int,
        default=1600,
        help="columns of nn_superglobal.pkl; 0 = every database image (the whole-file case)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the release and the model")
    p.add_argument("--topk", type=int, default=400, help="entries re-ranked by LoCoRe")
    p.add_argument("--window", type=int, default=50, help="LoCoRe window")
    p.add_argument("--stride", type=int, default=25, help="LoCoRe stride")
    p.add_argument(
        "--warm",
        action="store_true",
        help="keep the release in the page cache (default: evict its pages first, so every "
        "stage reads cold and 'read MB' counts what a first run fetches from disk)",
    )
    p.add_argument(
        "--delete-release",
        action="store_true",
        help="delete each release after its run (the 1M one is ~14 GB at 64-D, 48 locals)",
    )


@dataclasses.dataclass
class Stage:
    """One measured stretch of the child's run."""

    name: str
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0  # high-water mark of the stretch
    peak_anon_mb: float = 0.0  # largest sampled RssAnon: heap, not mapped file pages
    cpu_s: float = 0.0  # user + system CPU time (the wall time is shared on a busy machine)
    read_mb: float = 0.0  # /proc/<pid>/io read_bytes: bytes fetched from storage
    rchar_mb: float = 0.0  # bytes passed through read() calls (page cache hits included)


class Probe:
    """``/proc`` readings of one child process."""

    def __init__(self, pid: int):
        self.root = Path(f"/proc/{pid}")

    def status_kb(self, key: str) -> int:
        text = (self.root / "status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+)", text, re.M).group(1))

    def cpu_s(self) -> float:
        fields = (self.root / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def io(self) -> dict[str, int]:
        pairs = (line.split(":") for line in (self.root / "io").read_text().splitlines())
        return {k: int(v) for k, v in pairs}

    def reset_peak(self) -> None:
        (self.root / "clear_refs").write_text("5")  # VmHWM := VmRSS


def _stage_label(marker: str) -> str:
    """Readable name of a revisitop stage (``<tag>_hard`` / ``<tag>_hardstar`` -> setup)."""
    if marker == "shortlist":
        return "first stage: read nn_superglobal.pkl"
    setup = marker.rsplit("_", 1)[-1].replace("star", "*")
    return f"re-rank {setup} (superglobal + locore)"


def measure(command: list[str], run_dir: Path, log: Path) -> dict:
    """Run ``command`` (which writes its stages into ``run_dir``) and measure it per stage."""
    events: list[tuple[float, str]] = []  # (time, "start:<name>") from the child's log
    lock = threading.Lock()
    t0 = time.monotonic()
    with open(log, "w", buffering=1) as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.PIPE, text=True)

        def read_stderr() -> None:
            for line in proc.stderr:
                log_file.write(line)
                m = STAGE_LINE.search(line)
                if m:
                    with lock:
                        events.append((time.monotonic(), f"start:{m.group(1)}"))

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        probe = Probe(proc.pid)
        stages = [Stage("start: import, open the release")]
        seen_done: set[Path] = set()
        handled, current = 0, None  # events taken; the stage whose marker may end it
        last_io = latest_io = {"read_bytes": 0, "rchar": 0}
        last_cpu = latest_cpu = 0.0
        mark = t0
        rusage = None
        while rusage is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rusage, proc.returncode = usage, os.waitstatus_to_exitcode(status)
                break
            try:
                io_now = latest_io = probe.io()
                cpu_now = latest_cpu = probe.cpu_s()
                peak = probe.status_kb("VmHWM") / 1024
                anon = probe.status_kb("RssAnon") / 1024
            except (OSError, AttributeError):  # exiting: /proc entries vanish before wait4
                time.sleep(SAMPLE_S)
                continue
            stages[-1].peak_rss_mb = max(stages[-1].peak_rss_mb, peak)
            stages[-1].peak_anon_mb = max(stages[-1].peak_anon_mb, anon)
            with lock:
                cuts = events[handled:]
                handled = len(events)
            for done in sorted(run_dir.rglob("*.done.json")):
                if done not in seen_done:
                    seen_done.add(done)
                    cuts.append((time.monotonic(), f"done:{done.name.removesuffix('.done.json')}"))
            for t, event in cuts:  # log lines first, in order; then markers seen by this poll
                kind, name = event.split(":", 1)
                if kind == "done" and name != current:
                    continue  # the next stage's log line already ended this one
                current = name if kind == "start" else None
                t = max(t, mark)  # a log line read just before the previous poll's marker
                stage = stages[-1]
                stage.wall_s = t - mark
                stage.read_mb = (io_now["read_bytes"] - last_io["read_bytes"]) / MB
                stage.rchar_mb = (io_now["rchar"] - last_io["rchar"]) / MB
                stage.cpu_s = cpu_now - last_cpu
                last_io, last_cpu, mark = io_now, cpu_now, t
                label = _stage_label(name) if kind == "start" else f"after {name}"
                stages.append(Stage(label))
                try:
                    probe.reset_peak()
                    stages[-1].peak_rss_mb = probe.status_kb("VmRSS") / 1024
                    stages[-1].peak_anon_mb = probe.status_kb("RssAnon") / 1024
                except OSError:
                    pass
            time.sleep(SAMPLE_S)
        end = time.monotonic()
        reader.join(timeout=5)
    stages[-1].wall_s = end - mark
    if stages[-1].name.startswith("after "):  # the last stage's marker: scoring is left
        stages[-1].name = "evaluate + report"
    stages[-1].read_mb = (latest_io["read_bytes"] - last_io["read_bytes"]) / MB  # last sample
    stages[-1].rchar_mb = (latest_io["rchar"] - last_io["rchar"]) / MB
    stages[-1].cpu_s = latest_cpu - last_cpu
    return {
        "returncode": proc.returncode,
        "wall_s": end - t0,
        # wait4's maxrss covers only the last stage: each reset of the mark lowered it too
        "peak_rss_mb": max([rusage.ru_maxrss / 1024] + [s.peak_rss_mb for s in stages]),
        "read_mb": sum(s.read_mb for s in stages),
        "stages": [dataclasses.asdict(s) for s in _merge_gaps(stages)],
    }


def _merge_gaps(stages: list[Stage]) -> list[Stage]:
    """Fold the short stretch between a stage's marker and the next stage's log line (loading
    the previous stage's result) into the stage that follows."""
    out: list[Stage] = []
    carry: Stage | None = None
    for stage in stages:
        if stage.name.startswith("after ") and stage is not stages[-1]:
            carry = stage
            continue
        if carry is not None:
            for field in ("wall_s", "cpu_s", "read_mb", "rchar_mb"):
                setattr(stage, field, getattr(stage, field) + getattr(carry, field))
            for field in ("peak_rss_mb", "peak_anon_mb"):
                setattr(stage, field, max(getattr(stage, field), getattr(carry, field)))
            carry = None
        out.append(stage)
    return out


def evict(root: Path) -> None:
    """Drop the page-cache pages of every file under ``root`` (written back first, then
    ``POSIX_FADV_DONTNEED``: these files only, nothing else on the machine)."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def random_checkpoint(
    folder: Path, preset: str, dim: int, num_local: int, seed: int, **overrides
) -> Path:
    """A seeded random LoCoRe of ``preset`` (micro, base, ...) for descriptors of size ``dim``
    (written once; ``overrides`` go to ``build_model``, e.g. ``num_layers=1``)."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = build_model(preset, local_dim=dim, global_dim=dim, num_local=num_local, **overrides)
    model.save_pretrained(folder)
    return folder


def revisitop_command(release: Path, run_dir: Path, checkpoint: Path, args: argparse.Namespace):
    """The command measured: the real benchmark over the synthetic release."""
    return [
        sys.executable, "-m", "locore", "bench", "revisitop", "--dataset", "roxford5k",
        "--with-1m", "--from-official", str(release), "--out", str(run_dir), "--superglobal",
        "--checkpoint", str(checkpoint), "--num-local", str(args.num_local), "--device", "cpu",
        "--topk", str(args.topk), "--window", str(args.window), "--stride", str(args.stride),
        "--grids", "0",
    ]  # fmt: skip


def run_one(n: int, args: argparse.Namespace) -> dict:
    """Generate (or reuse) the release of ``n`` distractors, run the command, measure it."""
    out = Path(args.out)
    spec = ReleaseSpec(
        distractors=n,
        dim=args.dim,
        num_local=args.num_local,
        nn_depth=args.nn_depth or None,
        seed=args.seed,
    )
    release = out / f"release_n{n}_d{args.dim}_k{args.num_local}_m{args.nn_depth}"
    t = time.monotonic()
    reused = is_complete(release, spec)
    generate(release, spec)
    generate_s = time.monotonic() - t
    checkpoint = random_checkpoint(
        out / f"micro_d{args.dim}_k{args.num_local}",
        "micro",
        args.dim,
        args.num_local,
        args.seed,
        num_layers=1,
    )
    run_dir = out / f"run_n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: cached stages would skip work
    run_dir.mkdir(parents=True)
    command = revisitop_command(release, run_dir, checkpoint, args)
    if not args.warm:
        evict(release)
    print(f"N = {n:,}: release {release} ({release_bytes(release) / 1e9:.2f} GB)", flush=True)
    result = measure(command, run_dir, run_dir / "log.txt")
    table = (run_dir / "table.txt").read_text() if (run_dir / "table.txt").is_file() else ""
    record = {
        "n": n,
        "database": spec.num_gallery,
        "spec": spec.as_dict(),
        "release_bytes": release_bytes(release),
        "generate_s": None if reused else generate_s,
        "command": " ".join(command),
        "cold": not args.warm,
        "table": table,
        **result,
    }
    if args.delete_release:
        shutil.rmtree(release)
    return record


def read_records(path: Path) -> list[dict]:
    """The last record of each N in ``scale.jsonl``, by N."""
    if not path.is_file():
        return []
    last = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            last[record["n"]] = record
    return [last[n] for n in sorted(last)]


def report(records: list[dict]) -> str:
    """Markdown: one table of whole runs, one of stages per N."""
    lines = [
        "| N distractors | database | release GB | generate s | run s | peak RSS MB | read MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        gen = "reused" if r["generate_s"] is None else f"{r['generate_s']:.1f}"
        lines.append(
            f"| {r['n']:,} | {r['database']:,} | {r['release_bytes'] / 1e9:.2f} | {gen} | "
            f"{r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['read_mb']:,.0f} |"
        )
    lines += [
        "",
        "| N | stage | wall s | CPU s | peak RSS MB | peak anon MB | read MB | read() MB |",
        "| --- " * 8 + "|",
    ]
    for r in records:
        for s in r["stages"]:
            lines.append(
                f"| {r['n']:,} | {s['name']} | {s['wall_s']:.1f} | {s.get('cpu_s', 0):.1f} | "
                f"{s['peak_rss_mb']:,.0f} | {s.get('peak_anon_mb', 0):,.0f} | "
                f"{s['read_mb']:,.0f} | {s['rchar_mb']:,.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], out_png: Path) -> Path:
    """Log-log wall time and peak RSS against the database size, whole run and per stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    time_ax, mem_ax = fig.subplots(1, 2)
    ns = [r["database"] for r in records]
    names = list(dict.fromkeys(s["name"] for r in records for s in r["stages"]))
    for name in names:
        pts = [(r["database"], s) for r in records for s in r["stages"] if s["name"] == name]
        x = [n for n, _ in pts]
        time_ax.plot(x, [max(s["wall_s"], 1e-2) for _, s in pts], "o-", label=name)
        mem_ax.plot(x, [s["peak_rss_mb"] for _, s in pts], "o-", label=name)
    time_ax.plot(ns, [r["wall_s"] for r in records], "k^--", label="whole run")
    mem_ax.plot(ns, [r["peak_rss_mb"] for r in records], "k^--", label="whole run")
    heap = [max(s.get("peak_anon_mb", 0) for s in r["stages"]) for r in records]
    mem_ax.plot(ns, heap, "kv:", label="whole run, heap only (RssAnon)")
    mem_ax.legend(fontsize=7)
    for ax, title in ((time_ax, "wall time (s)"), (mem_ax, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("database images (4,993 + N distractors)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    time_ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png")
    return Path(out_png)


def run(args: argparse.Namespace) -> int:
    """Measure every ``--n`` and redraw the report from all records in ``--out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "scale.jsonl"
    status = 0
    for n in (int(v) for v in str(args.n).split(",") if v.strip()):
        record = run_one(n, args)
        with open(records_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["returncode"] != 0:
            print(f"N = {n:,}: the command failed; see {out / f'run_n{n}' / 'log.txt'}")
            status = 1
    records = read_records(records_path)
    text = report(records)
    write_text(out / "scale.md", text)
    plot(records, out / "scale.png")
    print(text)
    print(f"report in {out / 'scale.md'} and {out / 'scale.png'}")
    return status
