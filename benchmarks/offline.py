"""``locore bench offline``: the offline re-ranking chains on the demo collection and on a held-out
collection of photos the demo never uses (``benchmarks/datasets/heldout.py``), in one table.

Each collection is indexed once with the pipeline config (``--config``, default ``demo``); every
chain is then evaluated on the same index through ``engine.evaluate.evaluate_index`` (full-database
rankings, Revisited Easy/Medium/Hard mAP). Chains: global, SuperGlobal, LoCoRe, SuperGlobal +
LoCoRe, spatial, spatial + LoCoRe. SuperGlobal and spatial run with their defaults; LoCoRe is the
config's ``locore`` stage (the demo checkpoint with the demo settings). Writes ``offline.json``
and ``offline.csv`` (one row per collection and chain) and each chain's ``locore eval`` report.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

from locore.benchmarks.datasets import demo, heldout
from locore.core import config as cfg
from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, StageConfig
from locore.engine.evaluate import evaluate_index
from locore.engine.metrics import PROTOCOLS
from locore.engine.pipeline import build_index, open_index

logger = logging.getLogger(__name__)

# Chain label -> stage names; "locore" stands for the config's locore stage.
CHAINS = {
    "superglobal": ("superglobal",),
    "locore": ("locore",),
    "superglobal+locore": ("superglobal", "locore"),
    "spatial": ("spatial",),
    "spatial+locore": ("spatial", "locore"),
}
COLLECTIONS = ("demo", "heldout")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/offline"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of both generated collections")
    p.add_argument(
        "--collections", nargs="+", choices=COLLECTIONS, default=list(COLLECTIONS), help="which"
    )
    p.add_argument(
        "--chains", nargs="+", choices=list(CHAINS), default=list(CHAINS), help="re-ranked rows"
    )
    spec = heldout.HeldoutSpec()
    p.add_argument(
        "--subjects", type=int, default=spec.subjects, help="held-out subjects (fewer: quicker)"
    )
    p.add_argument(
        "--distractors", type=int, default=spec.distractors, help="held-out texture distractors"
    )


def collection(name: str, root: Path, seed: int, spec: heldout.HeldoutSpec) -> tuple[Path, Path]:
    """Generate (cached) the collection ``name``; returns its folder and gnd pickle."""
    if name == "demo":
        return demo.generate(root, demo.DemoSpec(seed=seed)), root / "gnd_demo.pkl"
    spec = dataclasses.replace(spec, seed=seed)
    return heldout.generate(root, spec), root / "gnd_heldout.pkl"


def chain_stages(chain: str, config: PipelineConfig) -> tuple[StageConfig, ...]:
    """The stages of ``chain``: defaults for SuperGlobal and spatial, the config's LoCoRe."""
    configured = {s.name: s for s in config.search.rerank}
    if "locore" in CHAINS[chain] and "locore" not in configured:
        raise UserError(
            f"chain {chain} needs a locore stage in the config's search.rerank; use "
            "--config demo or a config with one"
        )
    return tuple(configured[n] if n == "locore" else StageConfig(n) for n in CHAINS[chain])


def evaluate_chains(
    name: str,
    out: Path,
    seed: int,
    config: PipelineConfig,
    chains: list[str],
    spec: heldout.HeldoutSpec,
) -> dict[str, dict[str, float]]:
    """``{row: {protocol: mAP}}`` for the global ranking and each chain on collection ``name``
    (``spec``: the held-out collection's sizes)."""
    root, gnd = collection(name, out / name / "collection", seed, spec)
    build_index(root / "jpg", out / name / "index", config)
    handle = open_index(out / name / "index")
    rows: dict[str, dict[str, float]] = {}
    try:
        for chain in chains:
            search = dataclasses.replace(config.search, rerank=chain_stages(chain, config))
            chained = dataclasses.replace(
                handle, config=dataclasses.replace(handle.config, search=search)
            )
            logger.info("%s: evaluating %s", name, chain)
            report = evaluate_index(chained, gnd, root / "queries", out=out / name / chain)
            rows.setdefault("global", {p: report.before[p]["map"] for p in PROTOCOLS})
            rows[chain] = {p: report.after[p]["map"] for p in PROTOCOLS}
    finally:
        handle.close()
    return rows


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One block per collection: mAP per protocol and the Medium difference to global."""
    lines = [f"{'collection':<12}{'chain':<22}{'Easy':>8}{'Medium':>8}{'Hard':>8}{'dM':>8}"]
    for name, rows in results.items():
        base = rows["global"]["medium"]
        for chain, maps in rows.items():
            values = "".join(f"{maps[p]:8.2f}" for p in PROTOCOLS)
            delta = "" if chain == "global" else f"{maps['medium'] - base:+8.2f}"
            lines.append(f"{name:<12}{chain:<22}{values}{delta}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config_name = args.config or "demo"
    config = cfg.load(PipelineConfig, config_name, args.overrides)
    out: Path = args.out
    spec = heldout.HeldoutSpec(subjects=args.subjects, distractors=args.distractors)
    results = {
        name: evaluate_chains(name, out, args.seed, config, args.chains, spec)
        for name in args.collections
    }
    table = format_table(results)
    print(f"mAP (%), full-database rankings; index config {config_name}; dM = Medium - global")
    print(table)
    write_text(
        out / "offline.json",
        json.dumps({"config": config_name, "seed": args.seed, "results": results}, indent=2),
    )
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["collection", "chain", *PROTOCOLS, "delta_medium"])
    for name, rows in results.items():
        for chain, maps in rows.items():
            delta = maps["medium"] - rows["global"]["medium"]
            writer.writerow([name, chain, *(f"{maps[p]:.2f}" for p in PROTOCOLS), f"{delta:.2f}"])
    write_text(out / "offline.csv", text.getvalue())
    print(f"-> {out / 'offline.json'}, {out / 'offline.csv'}")
    return 0
