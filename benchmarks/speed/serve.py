"""``locore bench serve``: load test of ``locore serve`` on the demo index, over real HTTP.

The server runs as its own process (``python -m locore serve``) on 127.0.0.1 only; the clients
are threads of this process, each with one keep-alive connection, sending the demo queries with
their boxes. Two phases, each bounded by ``--duration`` seconds and ``--max-requests``:

    1 client     the latency a lone user sees (p50/p95/p99) and the one-client throughput
    N clients    ``--clients`` at once, ``--bad-share`` of them sending bad uploads in turn
                 (empty, not an image, truncated, 50 megapixels, a decompression bomb, an invalid
                 box, an unknown chain): good requests must all answer 200, bad ones a 4xx

Errors: a good request answered with anything but 200, a bad one with anything but a 4xx (a 429
once a junk client has spent its allowance of refusals), or any connection failure. The server
must still answer ``/healthz`` at the end (no crash). Each phase also records the server's own
stage times averaged over the good answers (``mean_server_ms``) and the CPU cores the server
process got (``server_cpu_cores``): a scheduler that shares the cores between the sessions of a
machine caps that, and with it what overlapping extraction and re-ranking can gain.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from locore.benchmarks.datasets.demo import DemoSpec, generate
from locore.core import config as cfg
from locore.engine.config import PipelineConfig
from locore.engine.evaluate import load_gnd
from locore.engine.pipeline import build_index

HOST = "127.0.0.1"  # the benchmark never targets another machine
RESULTS = Path(__file__).resolve().parent.parent / "results"


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels over one compressed row: what a
    decompression bomb (or a 50-megapixel photo) looks like before it is decompressed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1))
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prepared POST /search: multipart body and whether it must succeed."""

    kind: str
    body: bytes
    content_type: str
    good: bool


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """``(body, content type)`` of a form with an ``image`` file and text ``fields``."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = b"".join(parts) + head + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def requests_for(collection: Path) -> tuple[list[Request], list[Request]]:
    """(good requests: every demo query with its box, bad requests: one per kind)."""
    gt = load_gnd(collection / "gnd_demo.pkl")
    good = []
    for name, entry in zip(gt["qimlist"], gt["gnd"]):
        data = (collection / "queries" / f"{name}.jpg").read_bytes()
        box = ",".join(f"{v:.1f}" for v in entry["bbx"])
        good.append(Request(name, *multipart(data, {"box": box, "top_k": "20"}), True))
    photo = (collection / "queries" / f"{gt['qimlist'][0]}.jpg").read_bytes()
    with Image.open(io.BytesIO(photo)) as img:
        width, height = img.size
    bad_cases = {
        "empty": (b"", {}),
        "not an image": (b"%PDF-1.4 not a photo", {}),
        "truncated": (photo[: len(photo) // 2], {}),
        "50 megapixels": (png_declaring(8660, 5774), {}),
        "decompression bomb": (png_declaring(40000, 40000), {}),
        "invalid box": (photo, {"box": f"0,0,{width + 100},{height}"}),
        "unknown chain": (photo, {"chain": "nope"}),
    }
    bad = [Request(k, *multipart(data, form), False) for k, (data, form) in bad_cases.items()]
    return good, bad


@dataclasses.dataclass
class Tally:
    """What the clients of one phase saw."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)  # good requests
    stage_ms: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # sums
    done_at: list[float] = dataclasses.field(default_factory=list)  # their completion times
    good: int = 0
    bad: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def summary(self, start: float, stop: float) -> dict:
        """Throughput counts the good answers completed within [start, stop]; the requests
        still running at ``stop`` are awaited and checked but not counted."""
        lat = np.asarray(self.latencies_ms)
        pct = {f"p{p}_ms": round(float(np.percentile(lat, p)), 1) for p in (50, 95, 99)}
        in_window = sum(start <= t <= stop for t in self.done_at)
        answered = max(len(self.latencies_ms), 1)
        stages = {k: round(v / answered, 1) for k, v in sorted(self.stage_ms.items())}
        return {
            "good_requests": self.good,
            "bad_requests": self.bad,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "seconds": round(stop - start, 1),
            "throughput_qps": round(in_window / (stop - start), 2),
            **(pct if lat.size else {}),
            "mean_server_ms": stages,  # the server's own timings_ms, averaged over good answers
        }


def client(port: int, plan: list[Request], tally: Tally, stop: threading.Event, budget) -> None:
    """Send ``plan`` in a loop on one connection until ``stop`` or the shared budget runs out."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    i = 0
    while not stop.is_set() and budget():
        req = plan[i % len(plan)]
        i += 1
        start = time.perf_counter()
        try:
            conn.request("POST", "/search", req.body, {"Content-Type": req.content_type})
            response = conn.getresponse()
            payload = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as err:
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=120)
            status, payload = None, str(err).encode()
        elapsed = (time.perf_counter() - start) * 1000.0
        ok = status == 200 if req.good else status is not None and 400 <= status < 500
        with tally.lock:
            if req.good and ok:
                tally.latencies_ms.append(elapsed)
                tally.done_at.append(time.perf_counter())
                tally.stage_ms.update(json.loads(payload)["timings_ms"])
            tally.good += req.good
            tally.bad += not req.good
            if not ok:
                tally.errors.append(f"{req.kind}: {status} {payload[:120]!r}")
    conn.close()


def phase(port: int, plans: list[list[Request]], duration: float, max_requests: int) -> dict:
    """Run one client per plan for ``duration`` s or ``max_requests`` requests in all."""
    tally, stop = Tally(), threading.Event()
    sent = iter(range(max_requests))

    def budget() -> bool:
        return next(sent, None) is not None

    threads = [
        threading.Thread(target=client, args=(port, plan, tally, stop, budget), daemon=True)
        for plan in plans
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(duration)
    stop.set()
    end = time.perf_counter()
    for t in threads:
        t.join()
    return tally.summary(start, end)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_phase(server: subprocess.Popen, port: int, plans, duration, max_requests) -> dict:
    """:func:`phase`, plus the cores the server process got meanwhile: on a machine shared with
    other jobs this bounds what running stages side by side can gain."""
    cpu, wall = cpu_seconds(server.pid), time.perf_counter()
    summary = phase(port, plans, duration, max_requests)
    cores = (cpu_seconds(server.pid) - cpu) / (time.perf_counter() - wall)
    return {**summary, "server_cpu_cores": round(cores, 2)}


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def demo_index(work: Path, overrides: list[str]) -> tuple[Path, Path]:
    """(collection, index) of the full demo, built once under ``work`` and reused."""
    collection = generate(work / "collection", DemoSpec())
    build_index(collection / "jpg", work / "index", cfg.load(PipelineConfig, "demo", overrides))
    return collection, work / "index"


def start_server(index: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "locore", "serve", "--index", str(index), "--host", HOST]
    server = subprocess.Popen([*cmd, "--port", str(port), *extra], stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"locore serve exited with code {server.returncode}")
        try:
            if get_json(port, "/healthz").get("status") == "ok":
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("locore serve did not answer /healthz within 300 s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", type=Path, default=Path(".cache/serve_bench"), help="demo folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the demo config the index is built with (repeatable)",
    )
    p.add_argument("--clients", type=int, default=50, help="concurrent clients of phase 2")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of phase 2")
    p.add_argument("--single-duration", type=float, default=30.0, help="seconds of phase 1")
    p.add_argument("--max-requests", type=int, default=100_000, help="request cap per phase")
    p.add_argument("--bad-share", type=float, default=0.1, help="share of clients sending junk")
    p.add_argument("--serve-args", default="", help="extra `locore serve` flags, quoted")
    p.add_argument("--json", type=Path, default=RESULTS / "serve.json", help="result file")


def run(args: argparse.Namespace) -> int:
    """Build the demo index, start the server, run both phases, print and save the numbers."""
    collection, index = demo_index(args.work, args.overrides)
    good, bad = requests_for(collection)
    port = free_port()
    server = start_server(index, port, args.serve_args.split())
    load_before = [round(v, 1) for v in os.getloadavg()]
    try:
        phase(port, [good], 10.0, 2 * len(good))  # warm-up: every query once or twice
        single = measured_phase(server, port, [good], args.single_duration, args.max_requests)
        print(f"1 client : {json.dumps(single)}")
        n_bad = round(args.clients * args.bad_share)
        # each good client starts at another query, so a batch mixes input sizes as in real use
        turns = [good[i % len(good) :] + good[: i % len(good)] for i in range(args.clients - n_bad)]
        plans = [bad] * n_bad + turns
        many = measured_phase(server, port, plans, args.duration, args.max_requests)
        print(f"{args.clients} clients: {json.dumps(many)}")
        alive = get_json(port, "/healthz").get("status") == "ok"
        stats = get_json(port, "/stats")
    finally:
        server.terminate()
        server.wait(30)
    speedup = many["throughput_qps"] / max(single["throughput_qps"], 1e-9)
    record = {
        "command": " ".join(["locore bench serve", *sys.argv[3:]]),
        "cpus": os.cpu_count(),
        # 1/5/15-minute load averages before and after the phases (other jobs on the machine)
        "load_average_before": load_before,
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "clients": args.clients,
        "bad_clients": n_bad,
        "one_client": single,
        "many_clients": many,
        "throughput_ratio": round(speedup, 2),
        "server_alive": alive,
        "server_stats": stats,
    }
    print(
        f"throughput {many['throughput_qps']} q/s with {args.clients} clients = {speedup:.2f}x "
        f"one client; errors {many['errors']} + {single['errors']}; server alive: {alive}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(f"written {args.json}")
    return 0 if alive and not (many["errors"] or single["errors"]) else 1
