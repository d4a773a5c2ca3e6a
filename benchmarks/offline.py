"""``locore bench offline``: the offline re-ranking chains on the demo collection and on a held-out
collection of photos the demo never uses (``benchmarks/datasets/heldout.py``), in one table.
A third collection, ``validation`` (``benchmarks/datasets/offline_train.py``), is built from the
offline re-ranker's validation photos. With ``--save-logits``, every chain that ends with LoCoRe
also caches LoCoRe's window logits on the ranking the chain hands it
(``<out>/<collection>/<chain>/fusion_logits_hard.npz``) for ``locore bench fusion-grid``, which
chooses the fusion stored with the checkpoint.

Each collection is indexed once with the pipeline config (``--config``, default ``demo``); every
chain is then evaluated on the same index through ``engine.evaluate.evaluate_index`` (full-database
rankings, Revisited Easy/Medium/Hard mAP). Chains: global, SuperGlobal, LoCoRe, SuperGlobal +
LoCoRe, spatial, spatial + LoCoRe, diffusion, and SuperGlobal + diffusion without, before and
after LoCoRe. A stage the config lists runs with the config's options (LoCoRe: the demo
checkpoint with the demo settings), the others with their defaults. Writes ``offline.json``
and ``offline.csv`` (one row per collection and chain), ``offline.png`` (each chain's Medium mAP
change against global, a panel per collection) and each chain's ``locore eval`` report.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np

from locore.benchmarks import plots
from locore.benchmarks.datasets import demo, heldout, offline_train
from locore.benchmarks.fusion_grid import CACHE_FILE, METRICS_GND, FusionCache, labelled_rest
from locore.core import config as cfg
from locore.core.atomic import write_text
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig, StageConfig
from locore.engine.evaluate import GlobalOrder, evaluate_index, index_to_imlist, load_gnd
from locore.engine.metrics import PROTOCOLS, labelled
from locore.engine.pipeline import (
    IndexHandle,
    build_extractor,
    build_index,
    extract_queries,
    first_stage,
    open_index,
    rerank_chain,
)
from locore.indexing.shortlist import Shortlist
from locore.rerank.chain import build_stage

logger = logging.getLogger(__name__)

# Chain label -> stage names; "locore" stands for the config's locore stage.
CHAINS = {
    "superglobal": ("superglobal",),
    "locore": ("locore",),
    "superglobal+locore": ("superglobal", "locore"),
    "spatial": ("spatial",),
    "spatial+locore": ("spatial", "locore"),
    "diffusion": ("diffusion",),
    "superglobal+diffusion": ("superglobal", "diffusion"),
    "superglobal+diffusion+locore": ("superglobal", "diffusion", "locore"),
    "superglobal+locore+diffusion": ("superglobal", "locore", "diffusion"),
}
COLLECTIONS = ("demo", "heldout", "validation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/offline"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of both generated collections")
    p.add_argument(
        "--collections", nargs="+", choices=COLLECTIONS, default=["demo", "heldout"], help="which"
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
    p.add_argument(
        "--save-logits",
        action="store_true",
        help="cache the locore stage's window logits per collection for `bench fusion-grid`",
    )


def collection(name: str, root: Path, seed: int, spec: heldout.HeldoutSpec) -> tuple[Path, Path]:
    """Generate (cached) the collection ``name``; returns its folder and gnd pickle."""
    if name == "demo":
        return demo.generate(root, demo.DemoSpec(seed=seed)), root / "gnd_demo.pkl"
    if name == "validation":
        validation = offline_train.OfflineTrainSpec(seed=seed)
        return offline_train.validation_collection(root, validation), root / "gnd_validation.pkl"
    spec = dataclasses.replace(spec, seed=seed)
    return heldout.generate(root, spec), root / "gnd_heldout.pkl"


def chain_stages(chain: str, config: PipelineConfig) -> tuple[StageConfig, ...]:
    """The stages of ``chain``: a stage the config's ``search.rerank`` holds runs with its options
    there (LoCoRe must be there: it needs a checkpoint), any other with its defaults."""
    configured = {s.name: s for s in config.search.rerank}
    if "locore" in CHAINS[chain] and "locore" not in configured:
        raise UserError(
            f"chain {chain} needs a locore stage in the config's search.rerank; use "
            "--config demo or a config with one"
        )
    return tuple(configured.get(n, StageConfig(n)) for n in CHAINS[chain])


def evaluate_chains(
    name: str,
    out: Path,
    seed: int,
    config: PipelineConfig,
    chains: list[str],
    spec: heldout.HeldoutSpec,
    save_logits: bool = False,
) -> dict[str, dict[str, float]]:
    """``{row: {protocol: mAP}}`` for the global ranking and each chain on collection ``name``
    (``spec``: the held-out collection's sizes); ``save_logits``: also cache, for each chain
    ending with LoCoRe, its window logits in ``out/name/chain`` (:func:`save_window_logits`)."""
    root, gnd = collection(name, out / name / "collection", seed, spec)
    build_index(root / "jpg", out / name / "index", config)
    handle = open_index(out / name / "index")
    rows: dict[str, dict[str, float]] = {}
    try:
        for chain in chains:
            stages = chain_stages(chain, config)
            if save_logits and CHAINS[chain][-1] == "locore":
                path = out / name / chain / CACHE_FILE.format(setup="hard")
                save_window_logits(handle, gnd, root / "queries", stages, path, name)
            search = dataclasses.replace(config.search, rerank=stages)
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


def save_window_logits(
    handle: IndexHandle,
    gnd_path: Path,
    queries_dir: Path,
    stages: tuple[StageConfig, ...],
    path: Path,
    name: str,
) -> Path:
    """Cache the last of ``stages``' logits of the leading window of the ranking the stages
    before it return (:class:`~locore.benchmarks.fusion_grid.FusionCache`), the input of
    ``locore bench fusion-grid``: the chain as ``evaluate_index`` runs it (no junk partition),
    one window at the top, images past the ranking placed in the full-database global order."""
    gt = load_gnd(gnd_path)
    num_db = len(gt["imlist"])
    to_eval = index_to_imlist(handle.names, gt["imlist"], gnd_path)
    paths = [Path(queries_dir) / f"{query}.jpg" for query in gt["qimlist"]]
    extractor = build_extractor(handle.config.extractor)
    queries = extract_queries(extractor, paths, [g["bbx"] for g in gt["gnd"]])
    shortlist = first_stage(handle, queries, handle.config.search.topk)
    incoming = rerank_chain(stages[:-1], queries, shortlist, handle.database)
    ranking = Shortlist(ids=incoming.ids, sims=incoming.scores)
    window = build_stage(stages[-1]).window_logits(queries, ranking, handle.database)
    eval_ids = np.where(window.ids >= 0, to_eval[np.maximum(window.ids, 0)], -1)
    order = GlobalOrder(queries.global_desc, handle.database.global_desc, to_eval, num_db)
    placed = order.place(window.ids, labelled(gt["gnd"]))
    rest_ids, rest_pos = labelled_rest(placed, (eval_ids >= 0).sum(axis=1))
    fields = METRICS_GND["revisited"]
    return FusionCache(
        ids=eval_ids,
        sims=window.sims,
        logits=window.logits,
        lengths=window.lengths,
        gnd=[{k: [int(i) for i in g.get(k, [])] for k in fields} for g in gt["gnd"]],
        num_db=num_db,
        info={
            "dataset": name,
            "setup": "hard",
            "chain": [stage.name for stage in stages],
            "stage": stages[-1].name,
            "options": dict(stages[-1].options),
        },
        rest_ids=rest_ids,
        rest_pos=rest_pos,
    ).save(path)


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One block per collection: mAP per protocol and the Medium difference to global."""
    width = max([22] + [len(chain) + 2 for rows in results.values() for chain in rows])
    lines = [f"{'collection':<12}{'chain':<{width}}{'Easy':>8}{'Medium':>8}{'Hard':>8}{'dM':>8}"]
    for name, rows in results.items():
        base = rows["global"]["medium"]
        for chain, maps in rows.items():
            values = "".join(f"{maps[p]:8.2f}" for p in PROTOCOLS)
            delta = "" if chain == "global" else f"{maps['medium'] - base:+8.2f}"
            lines.append(f"{name:<12}{chain:<{width}}{values}{delta}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config_name = args.config or "demo"
    config = cfg.load(PipelineConfig, config_name, args.overrides)
    out: Path = args.out
    spec = heldout.HeldoutSpec(subjects=args.subjects, distractors=args.distractors)
    results = {
        name: evaluate_chains(name, out, args.seed, config, args.chains, spec, args.save_logits)
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
    plots.chain_deltas(results, out / "offline.png")
    print(f"-> {out / 'offline.json'}, {out / 'offline.csv'}, {out / 'offline.png'}")
    if args.save_logits:
        cache = CACHE_FILE.format(setup="hard")
        print(f"LoCoRe logits -> {out}/<collection>/<chain>/{cache} (bench fusion-grid --cache)")
    return 0
