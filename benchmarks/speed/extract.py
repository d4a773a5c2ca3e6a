"""``locore bench extract``: extractor throughput in images per second, random weights.

Two sources:

* ``tensors``: ``extract_batch`` on already decoded, resized and normalised inputs on the device
  (a 1024 x 768 photo at ``--imsize`` 770 -> 770 x 574 for DINOv2, 55 x 41 = 2,255 patches),
  including the top-K selection and the copy of the rows to the host; the GPU-bound number.
* ``jpeg``: end to end from JPEG files through the extraction runtime (:func:`locore.engine.extract.
  extract`: DataLoader decode + resize workers, size buckets, model, local store and global file
  writes) into a temporary folder.

Speed does not depend on the weights, so the model is built with ``weights="random"`` (and a
random detector where the model has one): nothing is downloaded. A warm-up pass (``--warmup``
batches) runs first; CUDA timings are synchronised.

Usage (wired as ``locore bench extract`` by the CLI, or directly):
    python -m locore.benchmarks.speed.extract --model dinov2_vitb14_reg --batch 32 --dtype bf16 \
        --source tensors --count 512
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from locore.core.device import resolve_device
from locore.core.errors import UserError
from locore.engine.extract import Item, extract
from locore.feature_extractors.registry import EXTRACTORS

logger = logging.getLogger(__name__)

PHOTO = (768, 1024)  # (H, W) of the synthetic photos: the ROxf/RPar landscape size


def synthetic_photo(seed: int, shape: tuple[int, int] = PHOTO) -> np.ndarray:
    """A smooth random RGB ``uint8`` image (JPEG-compressible like a photo, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (shape[0] // 16, shape[1] // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def build(model: str, dtype: str, imsize: int | None, device: str, weights: str, detector: str):
    """Extractor (random weights unless given) with only the options its factory accepts."""
    params = inspect.signature(EXTRACTORS.factory(model)).parameters
    wanted = {"weights": weights, "detector": detector, "dtype": dtype, "imsize": imsize}
    options = {k: v for k, v in wanted.items() if k in params and v is not None}
    if dtype != "fp32" and "dtype" not in params:
        raise UserError(f"extractor {model} has no dtype option; use --dtype fp32")
    return EXTRACTORS.create(model, **options).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_tensors(extractor, batch: int, count: int, warmup: int) -> tuple[int, float]:
    """(images, seconds) of ``extract_batch`` on one preprocessed photo repeated ``batch`` times."""
    device = extractor.device
    x = extractor.preprocess(synthetic_photo(0))
    inputs = x.unsqueeze(0).repeat(batch, 1, 1, 1).to(device)
    for _ in range(warmup):
        extractor.extract_batch(inputs)
    _sync(device)
    steps = max(1, count // batch)
    start = time.perf_counter()
    for _ in range(steps):
        extractor.extract_batch(inputs)
    _sync(device)
    return steps * batch, time.perf_counter() - start


def drift(extractor, batch: int) -> dict[str, float]:
    """Reduced-precision vs fp32 on the same photos: global (and CLS) cosine, share of the top-K
    tokens both select, and the mean cosine of the descriptors of those shared tokens."""
    device = extractor.device
    inputs = torch.stack([extractor.preprocess(synthetic_photo(i)) for i in range(batch)])
    low = extractor.extract_batch(inputs.to(device))
    dtype, extractor.dtype = extractor.dtype, "fp32"
    try:
        ref = extractor.extract_batch(inputs.to(device))
    finally:
        extractor.dtype = dtype
    out: dict[str, list[float]] = {"global cos": [], "top-K shared": [], "shared desc cos": []}
    for a, b in zip(low, ref):
        out["global cos"].append(float(a.global_desc @ b.global_desc))
        if "cls" in b.extra:
            out.setdefault("cls cos", []).append(float(a.extra["cls"] @ b.extra["cls"]))
        keys_a = {tuple(r) for r in np.c_[a.local.positions, a.local.scale_ids][~a.local.mask]}
        rows_b = np.c_[b.local.positions, b.local.scale_ids]
        shared = [i for i, r in enumerate(rows_b) if not b.local.mask[i] and tuple(r) in keys_a]
        out["top-K shared"].append(len(shared) / max(int((~b.local.mask).sum()), 1))
        index_a = {tuple(r): i for i, r in enumerate(np.c_[a.local.positions, a.local.scale_ids])}
        cos = [float(b.local.desc[i] @ a.local.desc[index_a[tuple(rows_b[i])]]) for i in shared]
        out["shared desc cos"].append(float(np.mean(cos)) if cos else float("nan"))
    return {k: float(np.mean(v)) for k, v in out.items()}


def time_jpeg(extractor, batch: int, count: int, warmup: int, workers: int) -> tuple[int, float]:
    """(images, seconds) of the extraction runtime on ``count`` JPEG files."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        items = []
        for i in range(count + warmup * batch):
            path = folder / f"img{i:06d}.jpg"
            cv2.imwrite(str(path), synthetic_photo(i)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            items.append(Item(path.stem, path))
        if warmup:
            extract(extractor, items[: warmup * batch], folder / "warm", batch, workers)
        _sync(extractor.device)
        start = time.perf_counter()
        report = extract(extractor, items[warmup * batch :], folder / "out", batch, workers)
        _sync(extractor.device)
        return report.done, time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``locore bench extract``."""
    parser.add_argument("--model", default="dinov2_vitb14_reg", help="registered extractor")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--source", choices=["tensors", "jpeg"], default="tensors")
    parser.add_argument("--count", type=int, default=64, help="timed images")
    parser.add_argument("--imsize", type=int, default=770, help="long side (models with imsize)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (jpeg)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--weights", default="random", help="model weights (speed: random)")
    parser.add_argument("--detector", default="random", help="detector weights, if any")
    parser.add_argument(
        "--drift", action="store_true", help="also compare --dtype with fp32 on --batch photos"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")


def run(args: argparse.Namespace) -> int:
    """Measure one setting and print it as a markdown table row."""
    device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    extractor = build(args.model, args.dtype, args.imsize, device, args.weights, args.detector)
    if args.source == "tensors":
        images, seconds = time_tensors(extractor, args.batch, args.count, args.warmup)
    else:
        images, seconds = time_jpeg(extractor, args.batch, args.count, args.warmup, args.workers)
    where = f"{device_name(device)}, {torch.get_num_threads()} threads"
    result = {
        "model": args.model,
        "source": args.source,
        "dtype": args.dtype,
        "batch": args.batch,
        "device": f"{device} ({where})",
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
    }
    print("| model | source | dtype | batch | device | images | seconds | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.source} | {args.dtype} | {args.batch} | {result['device']} "
        f"| {images} | {seconds:.2f} | {images / seconds:.3f} |"
    )
    if args.drift:
        result["drift"] = drift(extractor, args.batch)
        print(
            f"{args.dtype} vs fp32 ({args.weights} weights): "
            + ", ".join(f"{k} {v:.5f}" for k, v in result["drift"].items())
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def device_name(device: str) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
