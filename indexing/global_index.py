"""Global-descriptor index: exact or compressed inner-product search behind one interface.

Kinds:

* ``flat`` (default): exact, FAISS's brute-force inner product (``faiss.knn``, the kernel of
  ``IndexFlatIP``). On ``device="cuda"`` it searches with faiss-gpu when that imports, else with
  the torch path below, so a GPU is used either way.
* ``torch``: exact, searched by torch: matmul + top-k over database chunks, merged (float16 on
  CUDA, float32 on CPU, where it equals brute force). Stored like ``flat`` (plain arrays), so
  this kind needs no faiss at all (GPU images may not ship it).
* ``ivfpq``: IVF-PQ trained on a sample, for collections whose float vectors should not be
  scanned; candidates are re-scored from a float16 copy (``refine``) to keep recall@100 >= 0.95.
* ``hnsw``: FAISS HNSW graph over the float vectors (approximate, no training).

Descriptors must be L2-normalised (checked), so inner product is cosine similarity. A saved index
is a folder: ``names.json`` (id -> image name), ``index.json`` (format, kind, dim, metric, count,
options, segments) and the vectors: ``index.faiss`` for ivfpq and hnsw; for the exact kinds one
file per segment (:class:`_Segments`: ``.npy``, or a hard link to the raw ``global.f32`` the
rows came from), memory-mapped on load, so opening a 1M-image index reads nothing and growing
it writes at most the new rows. A save writes a temporary folder and renames it into place. A
save killed between its two renames leaves the previous index as ``.<name>.old``:
:meth:`GlobalIndex.load` reads it, and :func:`recover` (called by writers) renames it back and
deletes the temporary folders of killed saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from locore.core.device import resolve_device
from locore.core.errors import UserError

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivfpq", "hnsw", "torch")
OPTIONS = {  # besides "device", which every kind takes
    "flat": {"chunk"},
    "torch": {"chunk", "dtype"},
    "ivfpq": {"nlist", "m", "nbits", "nprobe", "refine", "k_factor", "sample"},
    "hnsw": {"hnsw_m", "ef_search", "ef_construction"},
}
REFINE = ("fp16", "flat", "none")
META_FILE, NAMES_FILE, INDEX_FILE = "index.json", "names.json", "index.faiss"
EXACT = ("flat", "torch")  # kinds that keep the float vectors, in segments
FORMAT_1_FILE = {"flat": INDEX_FILE, "torch": "vectors.npy"}  # before segments: one file
RAW_SUFFIX = ".f32"  # a segment linked from a raw float32 file (global.f32, the official *.pt)
METRIC = "inner_product"
FORMAT = 2  # 2: exact kinds list their segment files in index.json ("segments")


def check_vectors(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    """float32 ``[N, dim]``, finite, non-zero and (close to) unit norm, else a UserError."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise UserError(f"{what} have shape {x.shape}; the index needs [N, {dim}]")
    if not np.isfinite(x).all():
        row = int(np.argmax(~np.isfinite(x).all(axis=1)))
        raise UserError(f"{what} contain NaN or infinite values (row {row}); re-extract them")
    norms = np.linalg.norm(x, axis=1)
    if (norms < 1e-6).any():
        raise UserError(f"{what} contain a zero vector (row {int(np.argmin(norms))}); re-extract")
    if np.abs(norms - 1).max() > 1e-3:
        row = int(np.argmax(np.abs(norms - 1)))
        raise UserError(f"{what} are not L2-normalised (row {row}); normalise them first")
    return x


def default_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of ``dim`` up to min(64, dim / 8); sub-vectors of
    fewer than 8 dimensions make FAISS's PQ training ~20x slower for little recall."""
    cap = max(1, min(64, dim // 8))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: 4 sqrt(n), the usual FAISS guidance, within [16, 65536]."""
    return int(np.clip(4 * np.sqrt(n), 16, 65536))


def _faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _nprobe(options: dict) -> int:
    """Lists visited per query: a quarter of them by default (recall@100 >= 0.95, see tests)."""
    return min(options["nlist"], options.get("nprobe") or max(16, options["nlist"] // 4))


class GlobalIndex:
    """Inner-product index over L2-normalised global descriptors, with an id -> name table."""

    def __init__(self, dim: int, kind: str = "flat", **options: Any):
        if kind not in KINDS:
            raise UserError(f"unknown index kind {kind!r}; choose one of {list(KINDS)}")
        unknown = sorted(set(options) - OPTIONS[kind] - {"device"})
        if unknown:
            raise UserError(
                f"unknown option {unknown[0]!r} for index kind {kind!r}; "
                f"valid options: {sorted(OPTIONS[kind] | {'device'})}"
            )
        if int(dim) < 1:
            raise UserError(f"index dimension must be positive, got {dim}")
        self.dim, self.kind = int(dim), kind
        self.device = str(resolve_device(options.pop("device", "cpu")))
        self.options = dict(options)
        if self.device != "cpu" and kind in ("ivfpq", "hnsw"):
            logger.info("%s index searches on the CPU (only exact kinds use the GPU)", kind)
        self.names: list[str] = []
        self._gpu_index = None  # faiss-gpu copy of a flat index, built on first search
        self._device_db = None  # torch copy of the vectors, built on first search
        self._backend = self._make()

    @classmethod
    def build(cls, dim: int, kind: str = "flat", **options: Any) -> GlobalIndex:
        """An empty index of ``kind``.

        Options: ``device`` (cpu | cuda | cuda:N | auto; used by flat and torch), ``chunk``
        (database rows per torch matmul), ``dtype`` (torch: float16 | float32), ``nlist``, ``m``,
        ``nbits``,
        ``nprobe``, ``refine`` (fp16 | flat | none), ``k_factor``, ``sample`` (ivfpq),
        ``hnsw_m``, ``ef_search``, ``ef_construction`` (hnsw).
        """
        return cls(dim, kind, **options)

    def _make(self):
        if self.kind in EXACT:
            return _Segments(self.dim)
        import faiss

        o = self.options
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, o.get("hnsw_m", 32), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = o.get("ef_construction", 80)
            index.hnsw.efSearch = o.get("ef_search", 128)
            return index
        m = o.get("m") or default_m(self.dim)
        if self.dim % m:
            raise UserError(f"ivfpq option m={m} must divide the dimension {self.dim}")
        refine = o.get("refine", "fp16")
        if refine not in REFINE:
            raise UserError(f"ivfpq option refine={refine!r} must be one of {list(REFINE)}")
        if not o.get("nlist"):
            return None  # sized by train() from the number of vectors
        ivf = faiss.IndexIVFPQ(
            faiss.IndexFlatIP(self.dim),
            self.dim,
            o["nlist"],
            m,
            o.get("nbits", 8),
            faiss.METRIC_INNER_PRODUCT,
        )
        ivf.nprobe = _nprobe(o)
        if refine == "none":
            return ivf
        # PQ codes alone rank neighbours coarsely (recall@100 ~0.5 on clustered data); exact
        # re-scoring of k_factor * k candidates restores >= 0.95. A float16 copy scores them
        # for half the memory of float32, with errors ~1e-4 on cosine similarity.
        if refine == "flat":
            index = faiss.IndexRefineFlat(ivf)
        else:
            fp16 = faiss.IndexScalarQuantizer(
                self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            index = faiss.IndexRefine(ivf, fp16)
        index.k_factor = o.get("k_factor", 8)
        return index

    def __len__(self) -> int:
        return 0 if self._backend is None else int(self._backend.ntotal)

    def clear(self) -> None:
        """Remove every vector and name, keeping what was trained (ivfpq codebooks), so the
        index can be refilled without training again."""
        if self._backend is not None:
            self._backend.reset()
        self.names = []
        self._gpu_index = self._device_db = None

    def train(self, x: np.ndarray, seed: int = 0) -> None:
        """Train compressed kinds on a random sample of ``x`` (no-op for the other kinds)."""
        if self.kind != "ivfpq" or (self._backend is not None and self._backend.is_trained):
            return
        x = check_vectors(x, self.dim, "training vectors")
        if not self.options.get("nlist"):
            self.options["nlist"] = default_nlist(len(x))
        self._backend = self._make()
        nbits = self.options.get("nbits", 8)
        need = max(self.options["nlist"], 2**nbits)
        if len(x) < need:
            raise UserError(
                f"ivfpq needs at least {need} training vectors (nlist, 2^nbits), got {len(x)}; "
                "use index kind flat for small collections"
            )
        sample = self.options.get("sample") or max(100_000, 64 * self.options["nlist"])
        if len(x) > sample:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), sample, replace=False))]
        self._backend.train(x)

    def add(self, x: np.ndarray, names: Sequence[str] | None = None) -> None:
        """Append ``x`` ``[N, D]`` (L2-normalised); ``names`` default to the running ids."""
        x = check_vectors(x, self.dim, "descriptors")
        if names is None:
            names = [str(len(self) + i) for i in range(len(x))]
        if len(names) != len(x):
            raise UserError(f"got {len(names)} names for {len(x)} descriptors")
        if self._backend is None or not self._backend.is_trained:
            raise UserError("the ivfpq index is not trained; call train() on a sample first")
        self._backend.add(x)
        self.names.extend(str(n) for n in names)
        self._gpu_index = self._device_db = None

    def add_file(self, path: Path, start: int, names: Sequence[str]) -> None:
        """Append rows ``start`` to ``start + len(names)`` of the raw float32 file ``path``
        ``[*, D]`` (the extraction's ``global.f32``). Exact kinds keep them by reference and a
        save hard-links the file, so the index and the extraction share one copy; that is sound
        because such a file is only appended to or replaced, never rewritten in place. Other
        kinds read and encode the rows."""
        path = Path(path)
        rows = _raw_rows(path, int(start), len(names), self.dim)
        if self.kind not in EXACT:
            self.add(rows, names)
            return
        check_vectors(rows, self.dim, f"descriptors in {path}")
        self._backend.add_file(path, int(start), rows)
        self.names.extend(str(n) for n in names)
        self._gpu_index = self._device_db = None

    def search(
        self, q: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(sims [Q, k] float32, ids [Q, k] int64)``, best first.

        ``exclude[q]`` ids (e.g. the protocol's junk images) are removed from query q's results
        and the list is filled up with the next ones. Where fewer than ``k`` remain, ids are -1
        and sims -inf.
        """
        if len(self) == 0:
            raise UserError("the index is empty; add descriptors (locore index) before searching")
        if int(k) < 1:
            raise UserError(f"search needs k >= 1, got {k}")
        q = check_vectors(q, self.dim, "query descriptors")
        if exclude is not None and len(exclude) != len(q):
            raise UserError(f"exclude has {len(exclude)} sets for {len(q)} queries")
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        kk = min(int(k) + extra, len(self))
        sims, ids = self._search(q, kk)
        ids = ids.astype(np.int64)
        sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
        if exclude:
            sims, ids = _drop(sims, ids, exclude)
        return _pad(sims[:, :k], ids[:, :k], int(k))

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "torch" or (
            self.kind == "flat" and self.device != "cpu" and not _faiss_gpu()
        ):
            return self._torch_search(q, k)
        if self.kind == "flat" and self.device != "cpu" and k <= 2048:  # faiss-gpu's k limit
            if self._gpu_index is None:
                import faiss

                self._resources = faiss.StandardGpuResources()
                gpu = int(self.device.partition(":")[2] or 0)
                index = faiss.index_cpu_to_gpu(self._resources, gpu, faiss.IndexFlatIP(self.dim))
                for rows in self._backend.rows():
                    index.add(rows)
                self._gpu_index = index
            return self._gpu_index.search(q, k)
        return self._backend.search(q, k)

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search as chunked matmul + top-k, merged; float16 on CUDA unless asked."""
        import torch

        cuda = self.device != "cpu"
        dtype = getattr(torch, self.options.get("dtype") or ("float16" if cuda else "float32"))
        if self._device_db is None:  # copied to the device once, reused by every search
            self._device_db = [
                torch.from_numpy(rows).to(self.device, dtype) for rows in self._backend.rows()
            ]
        chunk = int(self.options.get("chunk") or 262_144)
        parts, offset = [], 0  # (first id, rows) over every segment
        for db in self._device_db:
            parts += [(offset + at, db[at : at + chunk]) for at in range(0, len(db), chunk)]
            offset += len(db)
        with torch.inference_mode():
            qt = torch.from_numpy(q).to(self.device, dtype)
            best_s, best_i = None, None
            for start, part in parts:
                s, i = (qt @ part.T).float().topk(min(k, len(part)), dim=1)
                i = i + start
                if best_s is not None:
                    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                    s, pos = s.topk(min(k, s.shape[1]), dim=1)
                    i = i.gather(1, pos)
                best_s, best_i = s, i
        return best_s.cpu().numpy(), best_i.cpu().numpy()

    def save(self, directory: Path) -> None:
        """Write the index, names and metadata atomically (temporary folder + rename). An exact
        index writes only the segments it does not have on disk yet (:class:`_Segments`)."""
        if self._backend is None:
            raise UserError("the ivfpq index is not trained; train and add before saving")
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not (directory / META_FILE).exists():
            raise UserError(f"{directory} exists and is not an index; save to another folder")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            meta = {
                "format": FORMAT,
                "kind": self.kind,
                "dim": self.dim,
                "metric": METRIC,
                "count": len(self),
                "options": self.options,
            }
            if self.kind in EXACT:
                meta["segments"] = entries = self._backend.save(tmp)
            else:
                import faiss

                faiss.write_index(self._backend, str(tmp / INDEX_FILE))
                _fsync_path(tmp / INDEX_FILE)
            _write_durably(tmp / META_FILE, json.dumps(meta, indent=1).encode())
            _write_durably(tmp / NAMES_FILE, json.dumps(self.names).encode())
            _fsync_path(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = _old_path(directory)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_path(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
        if self.kind in EXACT:
            self._backend.saved_in(directory, entries)

    @classmethod
    def load(cls, directory: Path, device: str = "cpu", dim: int | None = None) -> GlobalIndex:
        """Open a saved index; checks its files, dimension (against ``dim`` when given), metric
        and names. ``device`` picks where exact kinds search (see the module doc). Exact kinds
        are memory-mapped, not read: ``locore search`` opens a 1M-image index at once, and a
        grown index adds its rows beside the mapped ones. ivfpq and hnsw are read whole."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file() and (_old_path(directory) / META_FILE).is_file():
            # a save was interrupted between its two renames: the previous index is complete
            logger.warning("%s is missing; loading the previous copy left by a save", directory)
            directory = _old_path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise UserError(f"{directory} holds no saved index; build one with `locore index`")
        try:
            meta = json.loads(meta_path.read_text())
            kind, stored_dim, version = meta["kind"], int(meta["dim"]), int(meta.get("format", 1))
            if "segments" in meta:
                segments = [
                    {"file": str(e["file"]), "start": int(e["start"]), "rows": int(e["rows"])}
                    for e in meta["segments"]
                ]
            else:  # format 1: one file
                segments = [{"file": FORMAT_1_FILE.get(kind), "start": 0, "rows": None}]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{meta_path} is damaged; rebuild the index") from None
        if version > FORMAT:
            raise UserError(
                f"index {directory} has format {version}, newer than this locore's "
                f"{FORMAT}; upgrade locore or rebuild the index"
            )
        if meta.get("metric") != METRIC:
            raise UserError(
                f"index {directory} uses metric {meta.get('metric')!r}, not {METRIC}; rebuild it"
            )
        if dim is not None and int(dim) != stored_dim:
            raise UserError(
                f"index {directory} holds {stored_dim}-d descriptors, not {dim}-d; rebuild it "
                "with the current extractor"
            )
        index = cls(stored_dim, kind, device=device, **meta.get("options", {}))
        if kind in EXACT:
            index._backend = _Segments.load(directory, segments, stored_dim)
        else:
            index._backend = _read_faiss(directory / INDEX_FILE)
            if kind == "ivfpq":
                import faiss

                faiss.extract_index_ivf(index._backend).nprobe = _nprobe(index.options)
        if index._backend.d != stored_dim:
            raise UserError(f"index {directory}: stored dim {index._backend.d} != {stored_dim}")
        try:
            index.names = json.loads((directory / NAMES_FILE).read_text())
        except (OSError, ValueError):
            raise UserError(f"{directory / NAMES_FILE} is missing or damaged; rebuild") from None
        if len(index.names) != len(index):
            raise UserError(
                f"index {directory} has {len(index)} vectors but {len(index.names)} names"
            )
        return index


def _read_faiss(path: Path, mmap: bool = False):
    """A saved FAISS index (``mmap``: its flat vectors mapped, not read), checked for metric."""
    import faiss

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError:
        raise UserError(f"{path} is missing or damaged; rebuild the index") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"index {path.parent} does not use inner product; rebuild it")
    return index


@dataclasses.dataclass
class _Segment:
    """Rows ``[n, D]`` float32 of an exact index, and where their bytes live: ``origin`` (a
    file, its ``(device, inode)`` and the row they start at), or nowhere yet (added in memory).
    ``owner``: the FAISS index whose memory ``rows`` views (a format-1 flat file)."""

    rows: np.ndarray
    origin: Path | None = None
    inode: tuple[int, int] | None = None
    start: int = 0
    owner: Any = None
    raw: bool = False  # ``origin`` is a raw float32 file that may hold more rows (global.f32)

    def on_disk(self) -> bool:
        """True when ``origin`` is still this segment's file (another index saved over its
        folder may hold a file of the same name)."""
        try:
            return self.origin is not None and _inode(self.origin) == self.inode
        except OSError:
            return False


class _Segments:
    """The exact kinds' vectors: segments of immutable rows, memory-mapped on load.

    A segment is a ``.npy`` file, or a range of a raw float32 file that is only ever appended
    to or replaced (the extraction's ``global.f32``: :meth:`add_file`), so the index shares that
    file's bytes instead of holding a second copy. A save hard-links every file it already has
    into the new folder (copied where the file system cannot link) and writes only rows added in
    memory, so growing a 1M-image index reads none of its rows and writes at most the new ones
    (one FAISS flat file was read, reallocated and rewritten whole: 5 GB written, 12 GB of peak
    memory). ``.npy`` segments after the last raw one merge like a binary counter, the newest two
    whenever the older is not larger: adds of n rows leave at most log2(N / n) + 1 files and
    rewrite each row O(log(N / n)) times, block by block, never joined in memory. ``flat``
    searches the segments with ``faiss.knn`` and merges them with ``faiss.ResultHeap``;
    ``torch`` with torch (no faiss needed). Answers the faiss index calls :class:`GlobalIndex`
    makes (``ntotal``, ``d``, ``add``, ``reset``)."""

    is_trained = True

    def __init__(self, dim: int):
        self.d = dim
        self.segments: list[_Segment] = []

    @classmethod
    def load(cls, directory: Path, entries: Sequence[dict], dim: int) -> _Segments:
        """``entries``: ``{"file", "start", "rows"}`` per segment, as :meth:`save` wrote them."""
        store = cls(dim)
        for entry in entries:
            path, start, n = Path(directory) / entry["file"], entry["start"], entry["rows"]
            owner = None
            if path.suffix == ".faiss":  # format 1's flat index: its vectors, mapped
                import faiss

                owner = _read_faiss(path, mmap=True)
                size = int(owner.ntotal) * int(owner.d)
                rows = faiss.rev_swig_ptr(owner.get_xb(), size).reshape(-1, int(owner.d))
            elif path.suffix == RAW_SUFFIX:
                rows = _raw_rows(path, start, n, dim)
            else:
                try:
                    # copy-on-write: writable for torch.from_numpy; the file is never written
                    rows = np.load(path, mmap_mode="c", allow_pickle=False)
                except (OSError, ValueError):
                    raise UserError(f"{path} is missing or damaged; rebuild the index") from None
            if rows.ndim != 2 or rows.dtype != np.float32 or rows.shape[1] != dim:
                raise UserError(f"{path} holds {rows.dtype} {rows.shape}, not [N, {dim}] float32")
            if n is not None and len(rows) != n:
                raise UserError(f"{path} holds {len(rows)} rows, not {n}; rebuild the index")
            raw = path.suffix == RAW_SUFFIX
            store.segments.append(_Segment(rows, path, _inode(path), start, owner, raw))
        return store

    @property
    def ntotal(self) -> int:
        return sum(len(s.rows) for s in self.segments)

    def reset(self) -> None:
        self.segments = []

    def add(self, x: np.ndarray) -> None:
        if len(x):
            self.segments.append(_Segment(np.array(x, np.float32)))

    def add_file(self, path: Path, start: int, rows: np.ndarray) -> None:
        """Append ``rows`` ``[n, D]``, rows ``start`` to ``start + n`` of the raw float32 file
        ``path``, by reference (no copy)."""
        if not len(rows):
            return
        inode = _inode(path)
        last = self.segments[-1] if self.segments else None
        if last and last.raw and last.inode == inode and last.start + len(last.rows) == start:
            # the file grew since the last save: one longer range of it
            rows = _raw_rows(path, last.start, len(last.rows) + len(rows), self.d)
            self.segments[-1] = _Segment(rows, Path(path), inode, last.start, raw=True)
        else:
            self.segments.append(_Segment(rows, Path(path), inode, start, raw=True))

    def rows(self) -> list[np.ndarray]:
        """Each segment's ``[n, D]`` rows in id order, as plain ndarray views (no copy): once
        ``faiss.contrib.torch_utils`` is imported (pytorch-metric-learning does), FAISS takes
        any array whose type is not exactly ``np.ndarray``, a memmap too, for a torch tensor."""
        return [np.asarray(s.rows) for s in self.segments]

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` with FAISS: each segment scanned, the lists merged."""
        import faiss

        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        start = 0
        for rows in self.rows():
            sims, ids = faiss.knn(q, rows, min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(sims, ids + start)
            start += len(rows)
        heap.finalize()
        return heap.D, heap.I

    def save(self, folder: Path) -> list[dict]:
        """Put every segment's file into ``folder`` (a new index folder), named by its id
        range, and return their entries in id order (see :meth:`load`)."""
        groups: list[list[_Segment]] = []  # the segments each file will hold
        for segment in self.segments:
            if segment.origin is None and groups and groups[-1][-1].origin is None:
                groups[-1].append(segment)  # rows added in memory since the last save: one file
            else:
                groups.append([segment])

        def size(group: list[_Segment]) -> int:
            return sum(len(s.rows) for s in group)

        def shared(group: list[_Segment]) -> bool:  # raw files are linked, never merged
            return any(s.raw for s in group)

        while (
            len(groups) > 1
            and not (shared(groups[-2]) or shared(groups[-1]))
            and size(groups[-2]) <= size(groups[-1])
        ):
            groups[-2:] = [groups[-2] + groups[-1]]
        entries, first_id = [], 0
        for group in groups:
            n, head = size(group), group[0]
            kept = len(group) == 1 and head.on_disk()
            suffix = (RAW_SUFFIX if head.raw else head.origin.suffix) if kept else ".npy"
            file = f"segment-{first_id:012d}-{first_id + n:012d}{suffix}"
            if kept:
                try:
                    os.link(head.origin, folder / file)
                except OSError:
                    shutil.copyfile(head.origin, folder / file)
            else:
                out = np.lib.format.open_memmap(
                    folder / file, mode="w+", dtype=np.float32, shape=(n, self.d)
                )
                at = 0
                for segment in group:
                    out[at : at + len(segment.rows)] = segment.rows
                    at += len(segment.rows)
                out.flush()
                del out
            _fsync_path(folder / file)
            entries.append({"file": file, "start": head.start if kept else 0, "rows": n})
            first_id += n
        return entries

    def saved_in(self, directory: Path, entries: Sequence[dict]) -> None:
        """After a save moved into ``directory``: map its files, so memory holds no rows."""
        self.segments = _Segments.load(directory, entries, self.d).segments


def _raw_rows(path: Path, start: int, n: int, dim: int) -> np.ndarray:
    """Rows ``[start, start + n)`` of a raw float32 ``[*, dim]`` file, mapped copy-on-write."""
    if n == 0:
        return np.empty((0, dim), np.float32)
    try:
        return np.memmap(path, "<f4", "c", offset=4 * dim * start, shape=(n, dim))
    except (OSError, ValueError):
        raise UserError(
            f"{path} does not hold rows {start} to {start + n} of {dim} float32 values; "
            "re-run extraction or rebuild the index"
        ) from None


def _inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _old_path(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def exists(directory: Path) -> bool:
    """True when ``directory`` holds a saved index, or a save left the previous one beside it."""
    directory = Path(directory)
    return (directory / META_FILE).is_file() or (_old_path(directory) / META_FILE).is_file()


def recover(directory: Path) -> None:
    """Tidy what killed saves left beside ``directory``: the previous index is renamed back when
    the new one never arrived (else deleted), and temporary folders are deleted. Only for a
    writer: no save may be running."""
    directory = Path(directory)
    old = _old_path(directory)
    if old.is_dir():
        if (directory / META_FILE).is_file():
            shutil.rmtree(old)
        else:
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(old, directory)
            _fsync_path(directory.parent)
            logger.warning("restored %s from the copy an interrupted save left", directory)
    if directory.parent.is_dir():
        for tmp in directory.parent.glob(f".{directory.name}.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info("removed %s, left by a killed save", tmp)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop(
    sims: np.ndarray, ids: np.ndarray, exclude: Sequence[set[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Remove excluded ids per row; the kept ones move forward in order."""
    keep = ids >= 0
    for q, bad in enumerate(exclude):
        if bad:
            keep[q] &= ~np.isin(ids[q], np.fromiter(bad, np.int64, len(bad)))
    order = np.argsort(~keep, axis=1, kind="stable")
    sims = np.where(keep, sims, -np.inf).astype(np.float32)
    ids = np.where(keep, ids, -1)
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def _pad(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if sims.shape[1] < k:
        n, extra = sims.shape[0], k - sims.shape[1]
        sims = np.concatenate([sims, np.full((n, extra), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((n, extra), -1, np.int64)], 1)
    return np.ascontiguousarray(sims, np.float32), np.ascontiguousarray(ids, np.int64)
