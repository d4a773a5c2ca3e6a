"""``locore train --config NAME_OR_PATH [--set key=value ...]``.

The same entry point serves a plain CPU run and ``torchrun --nproc-per-node=N -m locore train``
(DDP, one process per GPU): :func:`locore.rerank.train.loop.train` reads ``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from pprint import pformat

from locore.core import config as cfg
from locore.core.errors import UserError
from locore.rerank.train.loop import TrainConfig, train

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (a preset in configs/train or a YAML path) and ``--set`` come from the CLI."""
    parser.add_argument("--out", default=None, help="run folder (overrides the config's out)")


def run(args: argparse.Namespace) -> int:
    """Train (or resume) the configured run; the merged config is saved in the run folder."""
    if args.config is None:
        raise UserError("locore train needs --config (a preset in configs/train or a YAML path)")
    extra = [f"out={args.out}"] if args.out else []
    config = cfg.load(TrainConfig, args.config, [*args.overrides, *extra], kind="train")
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        logger.info("training with\n%s", pformat(cfg.to_dict(config), sort_dicts=False))
        cfg.save(config, Path(config.out) / "train_config.yaml")
    out = train(config)
    if rank == 0:
        print(f"model -> {out}")
    return 0
