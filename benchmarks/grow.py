"""``locore bench grow``: an index of N images grows by M; what do ``locore index`` and
``locore search`` cost at N = 1,000,000? (issue #16, "indexes that grow")

1. **Base** (written once, resumable): a folder of N tiny distinct BMP images in folders of
   1,000, and an index of it in exactly the layout ``locore index`` writes -- ``config.yaml``,
   ``files.json`` (size, mtime and SHA-256 of every file), the local store, the raw globals and
   the global index -- written with the engine's own writers (``LocalStoreWriter``,
   ``GlobalIndex``, ``core.config.save``, ``core.digest.fingerprint``) but holding seeded random
   descriptors: a million extractions would take days on this CPU, and what is measured next
   does not depend on the values.
2. **Grow**: M new photos-like images (seeded noise, 96 px JPEG) are written into a new folder,
   then the real ``python -m locore index --images DIR --out INDEX`` runs as a child process,
   sampled from ``/proc`` (peak RSS, bytes read and written, CPU time); its ``times:`` line
   gives each stage (scan folder, compare files, extract, global index).
3. **Search**: the real ``python -m locore search QUERY --index INDEX`` (no re-ranking, then the
   index's default chain), first with the index's pages evicted from the page cache (cold),
   then again (warm); its ``times:`` line gives "open index" and "global search".

Results: ``OUT/grow.json`` and ``OUT/grow.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from locore.benchmarks.scale import MB, SAMPLE_S, Probe, evict
from locore.core import config as cfg
from locore.core.atomic import write_text
from locore.core.digest import fingerprint
from locore.core.errors import UserError
from locore.core.layout import GLOBAL_FILE, LOCAL_FILE
from locore.engine.config import load_pipeline
from locore.engine.pipeline import CONFIG_FILE, INDEX_SUBDIR, MANIFEST_FILE, build_extractor
from locore.indexing.global_index import GlobalIndex
from locore.indexing.local_store import LocalStoreWriter

PER_FOLDER = 1000
CHUNK = 20_000  # images of random descriptors written per step
BASE_DONE = "base.done.json"
TIMES = re.compile(r"times: (.*) \(total ([\d.]+) s\)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench grow``."""
    p = parser
    p.add_argument("--out", type=Path, required=True, help="images, index and report")
    p.add_argument("--n", type=int, default=1_000_000, help="images in the base index")
    p.add_argument("--add", type=int, default=10_000, help="images added to it")
    p.add_argument("--kind", default="flat", help="global index kind (flat, ivfpq, torch, hnsw)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=["extractor.options.imsize=128", "extractor.options.num_local=16"],
        help="settings of the demo preset the index uses (default: 128 px, 16 locals)",
    )
    p.add_argument("--seed", type=int, default=0)


def _bmp(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


def write_base(out: Path, n: int, overrides: list[str], kind: str, seed: int) -> dict:
    """The base folder and its index (see the module doc); returns what was written."""
    images, index = out / "images", out / "index"
    record = {"n": n, "kind": kind, "overrides": overrides, "seed": seed}
    marker = out / BASE_DONE
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == record:
        return json.loads(marker.read_text())
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    names = [f"base/{i // PER_FOLDER:04d}/{i:07d}.bmp" for i in range(n)]
    for name in names:
        path = images / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _bmp(rng).save(path)
    files_s = time.monotonic() - started
    config = load_pipeline("demo", [*overrides, f"index.kind={kind}"])
    extractor = build_extractor(config.extractor)
    index.mkdir(parents=True, exist_ok=True)
    cfg.save(config, index / CONFIG_FILE)
    manifest = {name: fingerprint(images / name).to_list() for name in names}
    write_text(
        index / MANIFEST_FILE,
        json.dumps({"root": str(images.resolve()), "files": manifest}, indent=0),
    )
    attrs = {
        "extractor": config.extractor.name,
        "images_root": str(images.resolve()),
        "config": str(cfg.to_dict(config)),
    }
    K, D, G = extractor.num_local, extractor.local_dim, extractor.global_dim
    vectors = GlobalIndex.build(G, kind=kind, **config.index.options)
    (index / LOCAL_FILE).unlink(missing_ok=True)
    with (
        LocalStoreWriter(
            index / LOCAL_FILE,
            K,
            D,
            config.extractor.store_dtype,
            attrs,
            capacity=n,
            durable=False,
        ) as store,
        open(index / GLOBAL_FILE, "wb") as raw,
    ):
        for start in range(0, n, CHUNK):
            size = min(CHUNK, n - start)
            rows = np.zeros((size, K, 5 + D), np.float32)
            rows[..., 4] = np.linspace(1, 0.1, K)  # weights, sorted as extraction stores them
            rows[..., 2] = rng.integers(0, 3, (size, K))  # scale ids
            rows[..., 5:] = rng.standard_normal((size, K, D))
            store.append(names[start : start + size], rows)
            globals_ = rng.standard_normal((size, G)).astype(np.float32)
            globals_ /= np.linalg.norm(globals_, axis=1, keepdims=True)
            raw.write(globals_.tobytes())
            if start == 0:
                vectors.train(globals_)  # ivfpq codebooks from the first chunk; others: no-op
    vectors.add_file(index / GLOBAL_FILE, 0, names)  # as `locore index` fills it
    vectors.save(index / INDEX_SUBDIR)
    done = {
        "spec": record,
        "seconds": round(time.monotonic() - started, 1),
        "files_s": round(files_s, 1),
        "num_local": K,
        "store_bytes": (index / LOCAL_FILE).stat().st_size,
        "global_bytes": (index / GLOBAL_FILE).stat().st_size,
        "index_bytes": _size(index / INDEX_SUBDIR),
        "index_own_bytes": _size(index / INDEX_SUBDIR, own=True),
    }
    write_text(marker, json.dumps(done, indent=1))
    return done


def _size(path: Path, own: bool = False) -> int:
    """Bytes of the files under ``path``; ``own``: only files not linked from elsewhere (an
    exact global index links ``global.f32``)."""
    stats = [p.stat() for p in Path(path).rglob("*") if p.is_file()]
    return sum(st.st_size for st in stats if not own or st.st_nlink == 1)


def add_images(images: Path, count: int, seed: int) -> Path:
    """``count`` new 96 px JPEGs (seeded noise blobs) in ``images/added/``."""
    rng = np.random.default_rng(seed + 1)
    folder = images / "added"
    for i in range(count):
        path = folder / f"{i // PER_FOLDER:04d}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 96), Image.BICUBIC).save(path, quality=90)
    return folder


def measure(command: list[str]) -> dict:
    """Run ``command``; its output, wall and CPU time, peak RSS, bytes read and written."""
    started = time.monotonic()
    # output to a file, not a pipe: nothing reads a pipe while the child runs, and a full one
    # (64 KB of log lines) would stop the child
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        probe, peak, io, cpu = Probe(child.pid), 0, {}, 0.0
        while child.poll() is None:
            try:
                peak = max(peak, probe.status_kb("VmHWM"))
                io, cpu = probe.io(), probe.cpu_s()
            except (OSError, AttributeError):
                pass  # the child ended between poll() and the read
            time.sleep(SAMPLE_S)
        log.seek(0)
        output = log.read()
    if child.returncode != 0:
        last = output.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{' '.join(command[1:4])} ... exited {child.returncode}: {last[0]}")
    stages = {}
    match = TIMES.search(output)
    if match:
        for part in match.group(1).split(", "):
            name, seconds, _ = part.rsplit(" ", 2)
            stages[name] = float(seconds)
    return {
        "command": " ".join(command),
        "wall_s": round(time.monotonic() - started, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(peak / 1024, 1),
        "read_mb": round(io.get("read_bytes", 0) / MB, 1),
        "written_mb": round(io.get("write_bytes", 0) / MB, 1),
        "stages": stages,
        "output": output[-2000:],
    }


def run(args: argparse.Namespace) -> int:
    """Base, grow, search; report."""
    out = Path(args.out)
    base = write_base(out, args.n, args.overrides, args.kind, args.seed)
    print(f"base: {args.n:,} images and their index in {out} ({base['seconds']} s)", flush=True)
    images, index = out / "images", out / "index"
    add_images(images, args.add, args.seed)
    settings = sum((["--set", s] for s in [*args.overrides, f"index.kind={args.kind}"]), [])
    store_before = (index / LOCAL_FILE).stat().st_size
    grow = measure(
        [sys.executable, "-m", "locore", "index", "--images", str(images), "--out", str(index),
         "--config", "demo", *settings]
    )  # fmt: skip
    grow["store_growth_mb"] = round(((index / LOCAL_FILE).stat().st_size - store_before) / MB, 1)
    print(grow["output"], flush=True)
    query = next((images / "added").rglob("*.jpg"))
    searches = {}
    # the chain's LoCoRe stages read as many locals as the base stores
    stages = load_pipeline(index / CONFIG_FILE).search.rerank
    fit = [
        arg
        for i, stage in enumerate(stages)
        if stage.name == "locore"
        for arg in ("--set", f"search.rerank.{i}.options.num_local={base['num_local']}")
    ]
    chains = {"global only": ["--set", "search.rerank=[]"], "default chain": fit}
    for chain, extra in chains.items():
        for state in ("cold", "warm"):
            if state == "cold":
                evict(index)
            searches[f"{chain}, {state}"] = measure(
                [sys.executable, "-m", "locore", "search", str(query), "--index", str(index),
                 *extra]
            )  # fmt: skip
    result = {"base": base, "add": args.add, "grow": grow, "search": searches}
    write_text(out / "grow.json", json.dumps(result, indent=1))
    table = report(result)
    write_text(out / "grow.md", table + "\n")
    print(table)
    return 0


def report(result: dict) -> str:
    """Markdown tables of :func:`run`'s result."""
    base, grow = result["base"], result["grow"]
    spec = base["spec"]
    lines = [
        f"Base: {spec['n']:,} images, {spec['kind']} global index, demo preset with "
        f"{', '.join(spec['overrides'])}; store {base['store_bytes'] / 1e9:.2f} GB, raw globals "
        f"{base['global_bytes'] / 1e9:.2f} GB, global index {base['index_bytes'] / 1e9:.2f} GB "
        f"({base['index_own_bytes'] / 1e9:.2f} GB not shared with the raw globals).",
        "",
        f"`locore index` adding {result['add']:,} images: wall {grow['wall_s']} s, CPU "
        f"{grow['cpu_s']} s, peak RSS {grow['peak_rss_mb']:,} MB, read {grow['read_mb']:,} MB, "
        f"written {grow['written_mb']:,} MB (store grew {grow['store_growth_mb']:,} MB)",
        "",
        "| stage | s |",
        "| --- | --- |",
        *(f"| {name} | {s:.2f} |" for name, s in grow["stages"].items()),
        "",
        "| `locore search` | wall s | open index s | global search s | re-rank s | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in result["search"].items():
        st = r["stages"]
        lines.append(
            f"| {label} | {r['wall_s']} | {st.get('open index', 0):.2f} | "
            f"{st.get('global search', 0):.2f} | {st.get('re-rank', 0):.2f} | "
            f"{r['peak_rss_mb']:,} |"
        )
    return "\n".join(lines)
