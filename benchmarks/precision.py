"""``locore bench precision``: what the local store's precision does to re-ranked rankings.

Our store keeps local descriptors in float16 by default (half the disk: 75 instead of 149 GB
for ROxf+1M at 768-D and 48 locals, docs/REPRODUCE.md); the official AMES files are float32.
This runs the real ``locore bench revisitop --from-official`` three times on one synthetic
release (:mod:`locore.benchmarks.datasets.synthetic_release`) and compares the re-ranked
rankings, query by query, with the run on the release as published:

    official float32   the release's flat float32 local files, read as they are
    store float32      the same files converted to our store (``locore convert --dtype float32``)
    store float16      converted to float16 (``locore convert``, the default)

Reported per variant: queries whose re-ranked top-k order differs from the official run's, the
mean number of top-k positions holding another image, the largest difference of an image's final
score, Medium/Hard/Hard* mAP and their change, and the gallery store's bytes per image. The
re-ranker is a seeded random LoCoRe (``--model micro|base`` at the release's descriptor size) or
a given ``--checkpoint``: what moves a ranking here is the rounding of the stored descriptors,
which reaches any model's logits. Only the local store changes between runs (globals, shortlist
and ground truth are the same files, linked), and only LoCoRe reads it (no SuperGlobal stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from locore.benchmarks.datasets.synthetic_release import ReleaseSpec, generate
from locore.benchmarks.revisitop import add_arguments as revisitop_arguments
from locore.benchmarks.revisitop import run_benchmark, settings_from_args
from locore.benchmarks.scale import random_checkpoint
from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.engine.config import load_pipeline
from locore.indexing.convert import convert

REFERENCE = "official float32"
VARIANTS = {REFERENCE: None, "store float32": "float32", "store float16": "float16"}
LOCAL_SUFFIX = "_local.hdf5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench precision``."""
    p = parser
    p.add_argument("--out", type=Path, required=True, help="release, stores, runs and report")
    p.add_argument("--n", type=int, default=10_000, help="distractors of the synthetic release")
    p.add_argument("--dim", type=int, default=64, help="descriptor size D")
    p.add_argument("--num-local", type=int, default=48, help="local descriptors per image")
    p.add_argument("--seed", type=int, default=0, help="seed of the release and the model")
    p.add_argument(
        "--model",
        choices=("micro", "base"),
        default="micro",
        help="seeded random LoCoRe of this size at the release's D (ignored with --checkpoint)",
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="a LoCoRe checkpoint instead")
    p.add_argument("--topk", type=int, default=100, help="entries re-ranked (and compared)")
    p.add_argument("--window", type=int, default=50, help="LoCoRe window")
    p.add_argument("--stride", type=int, default=25, help="LoCoRe stride")
    p.add_argument("--device", default="cpu", help="device of the re-ranker")


@dataclasses.dataclass(frozen=True)
class Agreement:
    """One variant's re-ranked ranking against the reference run's (``hard`` setup)."""

    queries: int
    order_changed: int  # queries whose top-k ids differ anywhere in order
    positions_moved: float  # mean top-k positions per query holding another image
    max_score_diff: float  # largest |score - reference score| of one image, over all queries

    @classmethod
    def of(cls, ids: np.ndarray, scores: np.ndarray, ref_ids, ref_scores, k: int) -> Agreement:
        """``ids``/``scores`` ``[Q, M]`` (final order) against the reference's, top ``k``."""
        moved = (ids[:, :k] != ref_ids[:, :k]).sum(axis=1)
        diff = 0.0
        for q in range(len(ids)):
            order, ref_order = np.argsort(ids[q]), np.argsort(ref_ids[q])
            if not np.array_equal(ids[q][order], ref_ids[q][ref_order]):
                raise UserError(f"query {q}: the variants re-ranked different shortlists")
            gap = np.abs(scores[q][order] - ref_scores[q][ref_order])
            diff = max(diff, float(np.nanmax(gap, initial=0.0)))
        return cls(len(ids), int((moved > 0).sum()), float(moved.mean()), diff)


def store_variant(release: Path, folder: Path, dtype: str) -> Path:
    """A copy of ``release`` whose local files are our store in ``dtype``; every other file is
    a link to the original (written once; conversion resumes after an interruption)."""
    for path in sorted(release.rglob("*")):
        if not path.is_file():
            continue
        target = folder / path.relative_to(release)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(LOCAL_SUFFIX):
            done = target.with_name(target.name + ".done")
            if not done.exists():
                convert(path, target, dtype=dtype)
                done.touch()
        elif not target.exists():
            target.symlink_to(path.resolve())
    return folder


def _final(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """Last stage's ``(ids, scores)`` of the ``hard`` setup cached by ``bench revisitop``."""
    (path,) = sorted((run / "rerank").glob("*_hard.npz"))
    with np.load(path) as z:
        last = max(int(k[3:]) for k in z.files if k.startswith("ids"))
        return z[f"ids{last}"], z[f"scores{last}"]


def _bench_args(release: Path, run: Path, checkpoint: Path, args: argparse.Namespace):
    """``bench revisitop`` options of one variant's run (LoCoRe only, no grids)."""
    parser = argparse.ArgumentParser()
    revisitop_arguments(parser)
    parsed = parser.parse_args(
        [
            "--dataset", "roxford5k", "--with-1m", "--from-official", str(release),
            "--out", str(run), "--checkpoint", str(checkpoint), "--num-local",
            str(args.num_local), "--device", args.device, "--topk", str(args.topk),
            "--window", str(args.window), "--stride", str(args.stride), "--grids", "0",
        ]
    )  # fmt: skip
    return settings_from_args(parsed)


def report(rows: list[dict], args: argparse.Namespace, model: str) -> str:
    """The Markdown table of ``precision.json``'s rows."""
    lines = [
        f"Store precision: synthetic ROxf+{args.n:,} release, D = {args.dim}, "
        f"{args.num_local} locals, {model}, LoCoRe over the top {args.topk} "
        f"(window {args.window}, stride {args.stride}); compared with the {REFERENCE} run",
        "",
        "| store | bytes / image | queries reordered | positions moved / query | "
        "max score diff | Medium | Hard | Hard* |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a = row["agreement"]
        lines.append(
            f"| {row['variant']} | {row['bytes_per_image']:,.0f} | {a['order_changed']} / "
            f"{a['queries']} | {a['positions_moved']:.2f} | {a['max_score_diff']:.2e} | "
            + " | ".join(
                f"{row[k]:.2f} ({row[k] - rows[0][k]:+.2f})" for k in ("medium", "hard", "hard*")
            )
            + " |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Generate (or reuse) the release and stores, run the three variants, compare, report."""
    out = Path(args.out)
    spec = ReleaseSpec(
        distractors=args.n, dim=args.dim, num_local=args.num_local, nn_depth=1600, seed=args.seed
    )
    release = generate(out / f"release_n{args.n}_d{args.dim}_k{args.num_local}", spec)
    if args.checkpoint is not None:
        checkpoint, model = args.checkpoint, f"checkpoint {args.checkpoint}"
    else:
        checkpoint = random_checkpoint(
            out / f"{args.model}_d{args.dim}_k{args.num_local}",
            args.model,
            args.dim,
            args.num_local,
            args.seed,
        )
        model = f"seeded random LoCoRe-{args.model}"
    config = load_pipeline(None, [])
    rows, reference = [], None
    for variant, dtype in VARIANTS.items():
        slug = variant.replace(" ", "_")
        source = release if dtype is None else store_variant(release, out / slug, dtype)
        run_dir = out / f"run_{slug}"
        print(f"{variant}: bench revisitop over {source}", flush=True)
        result = run_benchmark(_bench_args(source, run_dir, checkpoint, args), config)
        final = _final(run_dir)
        reference = reference or final
        gallery = next(source.rglob(f"*gallery{LOCAL_SUFFIX}"))
        metrics = result.rows[-1]
        rows.append(
            {
                "variant": variant,
                "store_dtype": dtype or "float32 (official file)",
                "bytes_per_image": gallery.stat().st_size / spec.num_gallery,
                "agreement": dataclasses.asdict(Agreement.of(*final, *reference, args.topk)),
                **{k: float(metrics[f"{k}_map"]) for k in ("medium", "hard", "hard*")},
            }
        )
    table = report(rows, args, model)
    write_text(out / "precision.json", json.dumps({"spec": spec.as_dict(), "rows": rows}, indent=1))
    write_text(out / "precision.md", table + "\n")
    print(table)
    return 0
