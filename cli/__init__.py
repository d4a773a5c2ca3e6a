"""The ``locore`` command line: a thin layer over the stage functions.

This is the only module that prints and configures logging. User errors (``UserError``) and bad
arguments become one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. A command gets ``--config``/``--set`` only when it reads a config, so no flag is ever
accepted and then ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from locore.core.errors import UserError

BENCH = "locore.benchmarks"


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand implemented in ``module`` (``add_arguments(parser)`` and ``run(args)``)."""

    module: str
    help: str
    examples: tuple[str, ...]  # shown at the end of ``--help``
    config: str | None = "pipelines"  # configs/<kind> of its --config presets; None = no config


COMMANDS: dict[str, Command] = {
    "extract": Command(
        "locore.cli.commands",
        "extract local + global descriptors of an image folder",
        ("locore extract --images photos/ --out feats/ --official mine",),
    ),
    "index": Command(
        "locore.cli.commands",
        "extract a folder and build its global index",
        (
            "locore index --images photos/ --out idx/",
            "locore index --images photos/ --out idx/ --config dinov2_locore",
        ),
    ),
    "search": Command(
        "locore.cli.commands",
        "query an index with image files (optionally re-ranked)",
        (
            "locore search q.jpg --index idx/ --rerank superglobal,locore",
            "locore search q1.jpg q2.jpg --index idx/ --grid top.png --out results.jsonl",
            "locore search q.jpg --index idx/ --box 40,30,200,180 --topk 100",
        ),
    ),
    "rerank": Command(
        "locore.cli.commands",
        "re-rank a shortlist file that came from elsewhere",
        ("locore rerank --index idx/ --shortlist nn.pkl --queries queries/ --rerank locore",),
    ),
    "eval": Command(
        "locore.cli.commands",
        "evaluate an index on a Revisited-format ground truth (format: README)",
        (
            "locore eval --index idx/ --gnd gnd_mine.pkl --queries queries/",
            "locore eval --index idx/ --gnd gnd_mine.pkl --queries queries/ --rerank locore "
            "--out eval/",
        ),
    ),
    "train": Command(
        "locore.cli.train",
        "train a LoCoRe re-ranker",
        ("locore train --config demo --set steps=100 --out runs/try",),
        config="train",
    ),
    "join": Command(
        "locore.cli.join",
        "join extraction shards (--shard i/N runs) into one extraction folder",
        ("locore join part0/ part1/ --out feats/",),
        config=None,
    ),
    "demo": Command(
        f"{BENCH}.demo",
        "run the whole pipeline on the embedded demo collection",
        ("locore demo --out demo_out/",),
    ),
    "serve": Command(
        "locore.serve",
        "serve an index over HTTP: search API and a web page",
        (
            "locore serve --index demo_out/index",
            "LOCORE_SERVE_TOKEN=secret locore serve --index idx/ --host 0.0.0.0 --port 8080",
        ),
        config=None,  # the index's own config; --set is its own flag
    ),
}
# ``locore bench <target>``
BENCH_TARGETS: dict[str, Command] = {
    "revisitop": Command(
        f"{BENCH}.revisitop",
        "the full Revisited Oxford/Paris (+1M) benchmark",
        ("locore bench revisitop --dataset roxford5k --data-root data/ --out runs/rox",),
    ),
    "latency": Command(
        f"{BENCH}.speed.latency",
        "per-stage latency and peak memory of one query",
        ("locore bench latency --device cpu",),
    ),
    "index": Command(
        f"{BENCH}.speed.index",
        "global index build/search speed and memory",
        ("locore bench index --n 100000 --kinds flat hnsw",),
        config=None,
    ),
    "extract": Command(
        f"{BENCH}.speed.extract",
        "extractor throughput (images/s)",
        ("locore bench extract --model efficientnet_lite0 --device cpu",),
        config=None,
    ),
    "rerank": Command(
        f"{BENCH}.speed.rerank",
        "LoCoRe latency per 100-image list, both backends",
        ("locore bench rerank --device cpu",),
        config=None,
    ),
    "serve": Command(
        f"{BENCH}.speed.serve",
        "load test of `locore serve` on the demo index: errors, throughput, latency",
        ("locore bench serve --clients 50 --duration 60",),
        config=None,
    ),
    "listwise": Command(
        f"{BENCH}.synthetic_listwise",
        "synthetic proof of list-wise context",
        ("locore bench listwise --steps 2000",),
        config=None,
    ),
    "superglobal": Command(
        f"{BENCH}.superglobal_latency",
        "SuperGlobal (or diffusion) re-ranking latency per query",
        ("locore bench superglobal --device cpu", "locore bench superglobal --stage diffusion"),
        config=None,
    ),
    "offline": Command(
        f"{BENCH}.offline",
        "offline re-ranking chains on the demo and a held-out collection, one table",
        ("locore bench offline --out runs/offline",),
    ),
    "fusion-grid": Command(
        f"{BENCH}.fusion_grid",
        "choose LoCoRe's fusion alpha/tau on cached logits",
        ("locore bench fusion-grid --cache runs/gldv2 --out runs/grid",),
        config=None,
    ),
    "scale": Command(
        f"{BENCH}.scale",
        "ROxf+1M at N distractors: synthetic release, the real command, time/memory per stage",
        ("locore bench scale --n 10000,100000 --out runs/scale",),
        config=None,
    ),
    "grow": Command(
        f"{BENCH}.grow",
        "an index of N images grows by M: locore index and locore search timed at N = 1M",
        ("locore bench grow --n 1000000 --add 10000 --out runs/grow",),
        config=None,
    ),
    "precision": Command(
        f"{BENCH}.precision",
        "float32 vs float16 local store: re-ranked rankings and mAP on a synthetic release",
        ("locore bench precision --n 10000 --out runs/precision",),
        config=None,
    ),
    "gpu": Command(
        f"{BENCH}.speed.gpu",
        "the GPU suite in one run: LoCoRe, training, extraction, sliding, search",
        (
            "locore bench gpu --out runs/gpu",
            "locore bench gpu --smoke --device cpu --out runs/gpu_smoke",
        ),
        config=None,
    ),
    "ray": Command(
        f"{BENCH}.speed.ray_extract",
        "extraction throughput on Ray with 1, 2, ... workers against one process",
        ("locore bench ray --images demo_out/collection/jpg --workers 1 2",),
    ),
}


class Parser(argparse.ArgumentParser):
    """An argument error is a :class:`UserError`: one line on stderr, exit code 2."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _epilog(examples: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


def _add_common(parser: argparse.ArgumentParser, kind: str | None) -> None:
    if kind is not None:
        parser.add_argument(
            "--config", default=None, help=f"preset name from configs/{kind} or a YAML path"
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


def _plug(subparsers, name: str, command: Command, key: str) -> None:
    parser = subparsers.add_parser(
        name,
        help=command.help,
        description=command.help,
        epilog=_epilog(command.examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, command.config)
    try:
        mod = importlib.import_module(command.module)
        # A module may serve several commands (add_<name>_arguments / run_<name>) or one.
        add = getattr(mod, f"add_{key}_arguments", None) or mod.add_arguments
        add(parser)
        parser.set_defaults(_run=getattr(mod, f"run_{key}", None) or mod.run)
    except ModuleNotFoundError as err:
        if err.name is None or not command.module.startswith(err.name):
            raise

        def missing(args: argparse.Namespace, _module: str = command.module) -> int:
            raise UserError(f"`locore {name}` is not available in this build ({_module} missing)")

        parser.set_defaults(_run=missing)


def build_parser() -> argparse.ArgumentParser:
    """The full ``locore`` parser (also used by the tests and the README)."""
    parser = Parser(
        prog="locore",
        description="Two-stage image retrieval: global search + LoCoRe list-wise re-ranking.",
        epilog=_epilog(("locore demo --out demo_out/", "locore index --images photos/ --out idx/")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        _plug(sub, name, command, name)
    bench_help = "benchmarks: accuracy, speed and memory, each printed and written as a report"
    bench = sub.add_parser(
        "bench",
        help=bench_help,
        description=bench_help,
        epilog=_epilog(("locore bench latency --device cpu", "locore bench revisitop --help")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_sub = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, command in BENCH_TARGETS.items():
        _plug(bench_sub, name, command, "bench")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locore`` console script."""
    if not sys.stderr.isatty() and "tqdm" not in sys.modules:
        # A log file gets log lines only: progress-bar frames (carriage returns) would interleave
        # with them. tqdm reads this when first imported, which building the parser does; on a
        # terminal, logging_redirect_tqdm below keeps bars and log lines apart.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = build_parser().parse_args(argv)
    except UserError as err:
        print(f"locore: error: {err}", file=sys.stderr)
        return 2
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
