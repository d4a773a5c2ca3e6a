"""Synthetic proof that LoCoRe uses list context: ``locore bench listwise``.

Lists come from :mod:`locore.rerank.train.synthetic` (easy, transitive and hard cases; see there).
Three rankings of held-out lists are compared by mAP overall and on transitive positives (easy
positives left out of the ranking): global-only, a pair-wise model (the same encoder fed one
query-candidate pair at a time) and LoCoRe, both trained by :func:`rerank.train.loop.train` with
the same steps, optimiser and number of query-candidate pairs per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from locore.engine.metrics import compute_ap
from locore.rerank.locore.config import LocoreConfig
from locore.rerank.locore.model import LocoreInputs, LocoreModel
from locore.rerank.train.loop import TrainConfig, read_log, train
from locore.rerank.train.synthetic import (
    EASY,
    TRANSITIVE,
    SyntheticLists,
    SyntheticPairs,
    SyntheticSpec,
    positive,
)

logger = logging.getLogger(__name__)


def model_config(
    spec: SyntheticSpec, hidden: int = 64, layers: int = 3, window: int | None = None
) -> LocoreConfig:
    """A small LoCoRe for the synthetic lists.

    ``window`` changes no parameter. By default it covers the whole list, so every token may
    attend to every other; the pair-wise twin uses one pair's length, because a sequence is
    padded to a multiple of the window and padding would cost it 6x the compute.
    """
    tokens = (1 + spec.gallery) * (spec.num_local + 2)
    return LocoreConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        intermediate_size=2 * hidden,
        attention_window=window or tokens + tokens % 2,
        max_positions=tokens + 256,
        local_dim=spec.dim,
        global_dim=spec.global_dim,
        num_local=spec.num_local,
        dropout=0.0,
    )


def mean_ap(scores: np.ndarray, kinds: np.ndarray) -> tuple[float, float]:
    """mAP over lists with all positives, and with transitive positives only (easy ones removed).

    Args:
        scores: ``[L, G]`` higher = better.
        kinds: ``[L, G]`` gallery kinds.
    """
    overall, transitive = [], []
    for s, k in zip(scores, kinds):
        order = np.argsort(-s, kind="stable")
        ranked = k[order]
        hits = np.flatnonzero(positive(ranked))
        overall.append(compute_ap(hits, len(hits)))
        kept = ranked[ranked != EASY]
        hits = np.flatnonzero(kept == TRANSITIVE)
        transitive.append(compute_ap(hits, len(hits)))
    return float(np.mean(overall)), float(np.mean(transitive))


@torch.inference_mode()
def score_lists(
    model: LocoreModel, lists: SyntheticLists, pairwise: bool, batch: int = 32
) -> np.ndarray:
    """``[L, G]`` max-end scores: whole lists, or each candidate alone (``pairwise``)."""
    model.eval()
    out = []
    for start in range(0, len(lists), batch):
        idx = np.arange(start, min(start + batch, len(lists)))
        inputs = lists.batch(idx)
        if pairwise:
            b, g = inputs.gallery_local.shape[:2]
            inputs = LocoreInputs(
                query_local=inputs.query_local.repeat_interleave(g, 0),
                query_scales=inputs.query_scales.repeat_interleave(g, 0),
                query_mask=inputs.query_mask.repeat_interleave(g, 0),
                gallery_local=inputs.gallery_local.reshape(
                    b * g, 1, *inputs.gallery_local.shape[2:]
                ),
                gallery_scales=inputs.gallery_scales.reshape(b * g, 1, -1),
                gallery_mask=inputs.gallery_mask.reshape(b * g, 1, -1),
                query_global=inputs.query_global.repeat_interleave(g, 0),
                gallery_global=inputs.gallery_global.reshape(b * g, 1, -1),
            )
            out.append(model(inputs).scores["max-end"].reshape(b, g))
        else:
            out.append(model(inputs).scores["max-end"])
    return torch.cat(out).float().numpy()


def run_benchmark(
    out: Path,
    steps: int = 12000,
    batch_size: int = 8,
    train_lists: int = 4000,
    test_lists: int = 300,
    lr: float = 1e-3,
    hidden: int = 64,
    layers: int = 3,
    seed: int = 0,
    spec: SyntheticSpec | None = None,
) -> dict:
    """Train LoCoRe and its pair-wise twin on the same lists; score held-out lists three ways."""
    spec = spec or SyntheticSpec()
    torch.manual_seed(seed)
    train_set = SyntheticLists(spec, train_lists, seed=seed)
    test_set = SyntheticLists(spec, test_lists, seed=seed + 1_000_003, shuffle=False)
    kinds = np.stack([it["kinds"] for it in test_set.lists])
    common = dict(
        steps=steps,
        lr=lr,
        warmup_steps=steps // 40,
        log_every=max(1, steps // 20),
        save_every=max(1, steps // 20) * steps,  # only the final checkpoint
        seed=seed,
        device="cpu",
    )
    results: dict = {"spec": dataclasses.asdict(spec), "steps": steps, "lists_per_step": batch_size}
    global_scores = np.stack([it["gallery_global"] @ it["query_global"] for it in test_set.lists])
    results["global"] = dict(zip(("map", "map_transitive"), mean_ap(global_scores, kinds)))
    for name, dataset, per_step, window in (
        ("pairwise", SyntheticPairs(train_set), batch_size * spec.gallery, 2 * spec.num_local + 4),
        ("locore", train_set, batch_size, None),
    ):
        folder = Path(out) / name
        architecture = dataclasses.asdict(model_config(spec, hidden, layers, window))
        config = TrainConfig(
            out=str(folder), model_overrides=architecture, batch_size=per_step, **common
        )
        started = time.perf_counter()
        train(config, dataset)
        seconds = time.perf_counter() - started
        model = LocoreModel.from_pretrained(folder)
        scores = score_lists(model, test_set, pairwise=name == "pairwise")
        ap, ap_t = mean_ap(scores, kinds)
        final = read_log(folder)[-1]["loss"]
        results[name] = {"map": ap, "map_transitive": ap_t, "train_s": seconds, "final_loss": final}
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench listwise``."""
    parser.add_argument("--steps", type=int, default=12000, help="optimiser steps per model")
    parser.add_argument("--batch-size", type=int, default=8, help="lists per step (pairs: x G)")
    parser.add_argument("--train-lists", type=int, default=4000)
    parser.add_argument("--test-lists", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")


def run(args: argparse.Namespace) -> int:
    """Train both models, print the table, optionally save JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        results = run_benchmark(
            Path(args.out or tmp),
            steps=args.steps,
            batch_size=args.batch_size,
            train_lists=args.train_lists,
            test_lists=args.test_lists,
            lr=args.lr,
            hidden=args.hidden,
            layers=args.layers,
            seed=args.seed,
        )
    print(f"{'ranking':<10} {'mAP':>7} {'mAP transitive':>15} {'train s':>8}")
    for name in ("global", "pairwise", "locore"):
        r = results[name]
        maps = f"{100 * r['map']:7.2f} {100 * r['map_transitive']:15.2f}"
        print(f"{name:<10} {maps} {r.get('train_s', 0):8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
