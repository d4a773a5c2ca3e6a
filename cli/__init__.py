"""The ``locore`` command line: a thin layer over the stage functions.

This is the only module that prints and configures logging. User errors (``UserError``) become
one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from locore.core.errors import UserError

BENCH = "locore.benchmarks"
# Subcommands implemented outside this file: name -> (module, help). Each module exposes
# ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("locore.cli.commands", "extract local + global descriptors of an image folder"),
    "index": ("locore.cli.commands", "extract a folder and build its global index"),
    "search": ("locore.cli.commands", "query an index with image files (optionally re-ranked)"),
    "rerank": ("locore.cli.commands", "re-rank a shortlist file that came from elsewhere"),
    "eval": ("locore.cli.commands", "evaluate an index on a Revisited-format ground truth"),
    "train": ("locore.cli.train", "train a LoCoRe re-ranker"),
    "demo": (f"{BENCH}.demo", "run the whole pipeline on the embedded demo collection"),
}
# ``locore bench <target>``: target -> (module, help).
BENCH_TARGETS: dict[str, tuple[str, str]] = {
    "revisitop": (f"{BENCH}.revisitop", "the full Revisited Oxford/Paris (+1M) benchmark"),
    "latency": (
        "locore.benchmarks.speed.latency",
        "per-stage latency and peak memory of one query",
    ),
    "index": (f"{BENCH}.speed.index", "global index build/search speed and memory"),
    "extract": (f"{BENCH}.speed.extract", "extractor throughput (images/s)"),
    "rerank": (
        "locore.benchmarks.speed.rerank",
        "LoCoRe latency per 100-image list, both backends",
    ),
    "listwise": (f"{BENCH}.synthetic_listwise", "synthetic proof of list-wise context"),
    "superglobal": (
        "locore.benchmarks.superglobal_latency",
        "SuperGlobal re-ranking latency per query",
    ),
    "fusion-grid": (
        "locore.benchmarks.fusion_grid",
        "choose LoCoRe's fusion alpha/tau on cached logits",
    ),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="preset name from configs/pipelines or a YAML path"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set search.topk=100 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _plug(subparsers, name: str, module: str, help_text: str, key: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    _add_common(parser)
    try:
        mod = importlib.import_module(module)
        # A module may serve several commands (add_<name>_arguments / run_<name>) or one.
        add = getattr(mod, f"add_{key}_arguments", None) or mod.add_arguments
        add(parser)
        parser.set_defaults(_run=getattr(mod, f"run_{key}", None) or mod.run)
    except ModuleNotFoundError as err:
        if err.name is None or not module.startswith(err.name):
            raise

        def missing(args: argparse.Namespace, _module: str = module) -> int:
            raise UserError(f"`locore {name}` is not available in this build ({_module} missing)")

        parser.set_defaults(_run=missing)


def build_parser() -> argparse.ArgumentParser:
    """The full ``locore`` parser (also used by the tests and the README)."""
    parser = argparse.ArgumentParser(
        prog="locore",
        description="Two-stage image retrieval: global search + LoCoRe list-wise re-ranking.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _plug(sub, name, module, help_text, name)
    bench = sub.add_parser("bench", help="benchmarks (accuracy, speed, memory)")
    bench_sub = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, (module, help_text) in BENCH_TARGETS.items():
        _plug(bench_sub, name, module, help_text, "bench")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locore`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs CPU-feature probing
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            return int(args._run(args) or 0)
    except UserError as err:
        print(f"locore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("locore: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
