"""``locore train --config NAME_OR_PATH [--set key=value ...]``."""

from __future__ import annotations

import argparse

from engine import config as cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run folder (overrides the config's out)")


def run(args: argparse.Namespace) -> int:
    from rerank.train.loop import TrainConfig, train

    if args.config is None:
        from engine.errors import UserError

        raise UserError("locore train needs --config (a preset in configs/train or a YAML path)")
    extra = [f"out={args.out}"] if args.out else []
    config = cfg.load(TrainConfig, args.config, [*args.overrides, *extra], kind="train")
    cfg.save(config, __import__("pathlib").Path(config.out) / "train_config.yaml")
    print(f"model -> {train(config)}")
    return 0
