"""``locore serve``: an HTTP service and a web page for querying an index by photo.

The extractor, the re-ranking chains, the global index and the local store are loaded once
(``service``); the routes (``app``) check uploads (``uploads``) and queue queries for a worker
that answers them in micro-batches. Binds 127.0.0.1 by default; any other address needs a bearer
token (``--token`` or ``LOCORE_SERVE_TOKEN``).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
from pathlib import Path

from locore.core.errors import UserError
from locore.serve.service import SearchService, ServeConfig

logger = logging.getLogger(__name__)

TOKEN_ENV = "LOCORE_SERVE_TOKEN"
DEFAULTS = ServeConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="index folder (from `locore index`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the index's config, e.g. --set search.topk=200 (repeatable)",
    )
    p.add_argument("--host", default=DEFAULTS.host, help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help="TCP port")
    p.add_argument(
        "--token", default=None, help=f"bearer token (default: ${TOKEN_ENV}); needed off loopback"
    )
    p.add_argument("--images", type=Path, default=None, help="image folder of the index")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULTS.max_upload_bytes / 2**20,
        help="upload limit",
    )
    p.add_argument(
        "--max-megapixels", type=float, default=DEFAULTS.max_pixels / 1e6, help="decoded size limit"
    )
    p.add_argument("--max-batch", type=int, default=DEFAULTS.max_batch, help="queries per batch")
    p.add_argument(
        "--max-wait-ms", type=float, default=DEFAULTS.max_wait_ms, help="batch gathering wait"
    )
    p.add_argument("--queue-size", type=int, default=DEFAULTS.queue_size, help="queued queries")
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS.threads,
        help="torch threads of a stage working alone (one each while extraction and re-ranking "
        "overlap)",
    )


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Flags -> :class:`ServeConfig`; refuses a non-loopback address without a token."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise UserError(
            f"binding {args.host} exposes the index beyond this machine; pass --token or set "
            f"{TOKEN_ENV}, or bind 127.0.0.1"
        )
    if min(args.max_batch, args.queue_size, args.threads) < 1 or args.max_wait_ms < 0:
        raise UserError(
            "--max-batch, --queue-size and --threads must be >= 1 and --max-wait-ms >= 0"
        )
    return dataclasses.replace(
        DEFAULTS,
        host=args.host,
        port=args.port,
        token=token,
        images=args.images,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        threads=args.threads,
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def run(args: argparse.Namespace) -> int:
    config = serve_config(args)
    try:  # the web stack is an optional extra: import it only when serving
        import uvicorn

        from locore.serve.app import create_app
    except ImportError as err:
        raise UserError(
            f"`locore serve` needs {err.name}; install it with pip install 'locore[serve]'"
        ) from None
    if not args.verbose:  # the stages log every call: one line per batch would flood the output
        logging.getLogger("locore.rerank").setLevel(logging.WARNING)
    service = SearchService(args.index, args.overrides, config)
    service.start()
    try:
        logger.info("serving %s on http://%s:%d/", args.index, config.host, config.port)
        uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="warning")
    finally:
        service.close()
    return 0
