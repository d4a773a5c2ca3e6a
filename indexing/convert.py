"""Official local-descriptor files -> our store layout (``locore convert``).

Reads the official flat float32 layout and the compound AMES layout (reference-spec §1.3) as they
are, and writes our layout: float16 by default, one chunk per image, names inside, rows sorted by
weight with padding last (so ``[:L]`` is the top L), optionally only the first K rows per image.
The padding flags are checked on the way: rows flagged as padding must have zero descriptors.
One third-party note says some AMES compound files mark valid rows with 1; such a file fails the
check with a hint to pass ``--invert-padding``. Conversion is resumable like extraction: rerun the
same command after an interruption and it continues after the last committed batch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from locore.core.errors import UserError
from locore.core.layout import NUM_META
from locore.indexing.local_store import LocalStore, LocalStoreWriter

logger = logging.getLogger(__name__)

BATCH_BYTES = 256 * 2**20  # float32 rows read per batch


def read_image_list(path: Path) -> list[str]:
    """Image names of an official list: the first comma-separated field of each non-empty line
    (reference-spec §1.2)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image list {path} does not exist")
    return [line.split(",")[0].strip() for line in path.read_text().splitlines() if line.strip()]


def sort_rows(rows: np.ndarray) -> np.ndarray:
    """Rows ``[B, K, 5 + D]`` reordered per image: valid rows by weight descending, then padding.

    Stable, so rows that are already in that order (official extraction output) stay put.
    """
    key = np.where(rows[..., 3] != 0, np.inf, -rows[..., 4])
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(rows, order[..., None], axis=1)


def normalise_padding(rows: np.ndarray, invert: bool, first_id: int, source: Path) -> np.ndarray:
    """Check (and, with ``invert``, flip) the padding flags of ``rows`` ``[B, K, 5 + D]``.

    Padded rows are all zeros except the flag (reference-spec §1.3); a flagged row with a
    non-zero descriptor means the file uses another convention.
    """
    padded = rows[..., 3] != 0
    if invert:
        padded = ~padded
        rows = rows.copy()
        rows[..., 3] = padded
    filled = np.abs(rows[..., NUM_META:]).max(axis=-1) > 0
    bad = padded & filled
    if bad.any():
        image = first_id + int(np.argwhere(bad)[0][0])
        hint = "drop --invert-padding" if invert else "pass --invert-padding"
        raise UserError(
            f"{source}: image {image} has rows flagged as padding with non-zero descriptors; "
            f"if the file marks valid rows with 1, {hint}"
        )
    return rows


def convert(
    src: Path,
    dst: Path,
    names: Sequence[str] | None = None,
    dtype: str = "float16",
    num_local: int | None = None,
    invert_padding: bool = False,
    attrs: dict | None = None,
) -> Path:
    """Write the store ``dst`` from ``src`` (official flat/compound file, or one of ours).

    Args:
        names: one name per image in file order (e.g. from :func:`read_image_list`); default:
            the names stored in ``src``, else the row numbers.
        dtype: ``float16`` or ``float32`` for ``dst``.
        num_local: rows kept per image (the top ``num_local`` by weight); default all.
        invert_padding: the source marks valid rows with 1 (see module doc).
        attrs: extra attributes for ``dst`` (the source and its layout are always recorded).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise UserError(f"convert {src} into another file, not onto itself")
    with LocalStore(src) as store:
        total = len(store)
        keep = store.num_local if num_local is None else int(num_local)
        if not 1 <= keep <= store.num_local:
            raise UserError(f"--num-local {keep}: {src} stores {store.num_local} rows per image")
        if names is None:
            names = store.names or [str(i) for i in range(total)]
        names = list(names)
        if len(names) != total:
            raise UserError(f"{len(names)} names given for the {total} images of {src}")
        layout = "compound" if store.compound else store.attrs.get("layout", "flat")
        meta = {
            "source": str(src.resolve()),
            "source_layout": layout,
            "source_num_local": store.num_local,
            "padding_inverted": bool(invert_padding),
        }
        batch = max(1, BATCH_BYTES // (store.num_local * (NUM_META + store.dim) * 4))
        with LocalStoreWriter(
            dst, keep, store.dim, dtype, attrs={**(attrs or {}), **meta}, capacity=total
        ) as writer:
            done = writer.committed
            if writer.names != names[:done]:
                raise UserError(
                    f"{dst} already holds other images than the first {done} of {src}; "
                    "write to a new file"
                )
            with tqdm(total=total, initial=done, desc="convert", unit="img") as bar:
                for start in range(done, total, batch):
                    stop = min(start + batch, total)
                    rows = store.rows(np.arange(start, stop))
                    rows = normalise_padding(rows, invert_padding, start, src)
                    writer.append(names[start:stop], sort_rows(rows)[:, :keep])
                    bar.update(stop - start)
    logger.info("converted %d images of %s (%s) into %s", total, src, layout, dst)
    return dst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``locore convert``."""
    parser.add_argument("src", type=Path, help="official local HDF5 (flat or compound) or a store")
    parser.add_argument("dst", type=Path, help="our store to write (resumed when it exists)")
    parser.add_argument(
        "--names", type=Path, default=None, help="image list .txt (first field per line)"
    )
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument(
        "--num-local", type=int, default=None, help="rows kept per image (default: all)"
    )
    parser.add_argument(
        "--invert-padding", action="store_true", help="the source marks valid rows with 1"
    )


def run(args: argparse.Namespace) -> int:
    """``locore convert SRC DST``."""
    names = read_image_list(args.names) if args.names else None
    convert(
        args.src,
        args.dst,
        names=names,
        dtype=args.dtype,
        num_local=args.num_local,
        invert_padding=args.invert_padding,
    )
    return 0
