"""Every bad input is reported in one line; the rest is indexed and nothing written is lost."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from skimage import data

from locore.cli import main
from locore.core import config as cfg
from locore.core.errors import UserError
from locore.engine.config import PipelineConfig
from locore.engine.pipeline import build_index, open_index, search
from locore.feature_extractors.io import ImageError, load_image

CONFIG = cfg.load(PipelineConfig, "demo", ["extractor.options.imsize=128", "search.topk=20"])


def _jpeg(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


@pytest.fixture()
def messy(tmp_path):
    """A folder with good images, every kind of bad file and unusual-but-valid formats."""
    root = tmp_path / "images"
    root.mkdir()
    photo = data.astronaut()[::2, ::2]  # 256 x 256
    (root / "good.jpg").write_bytes(_jpeg(photo))
    (root / "corrupt.jpg").write_bytes(_jpeg(photo)[:300])
    (root / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "tiny.png")
    Image.fromarray(data.camera()).save(root / "gray.png")
    Image.fromarray(data.coffee()).convert("CMYK").save(root / "cmyk.jpg")
    sixteen = (data.camera().astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    Image.fromarray(data.chelsea()).save(root / "rotated.jpg", exif=exif)
    (root / "unreadable.jpg").symlink_to(tmp_path / "does-not-exist.jpg")
    return root


def test_image_loader_normalises_formats(messy):
    assert load_image(messy / "gray.png").shape == (512, 512, 3)
    assert load_image(messy / "cmyk.jpg").shape == (400, 600, 3)
    deep = load_image(messy / "deep16.png")
    np.testing.assert_array_equal(deep[..., 0], data.camera())  # full 16-bit range -> 8 bits
    assert load_image(messy / "rotated.jpg").shape == (451, 300, 3)  # EXIF rotation applied
    for name, reason in [
        ("corrupt.jpg", "cannot be decoded"),
        ("text.jpg", "cannot be decoded"),
        ("unreadable.jpg", "missing or unreadable"),
    ]:
        with pytest.raises(ImageError, match=reason) as err:
            load_image(messy / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_index_reports_bad_files_and_keeps_the_rest(messy, tmp_path):
    summary = build_index(messy, tmp_path / "index", CONFIG)
    skipped = dict(summary.extract.skipped)
    assert set(skipped) == {"corrupt.jpg", "text.jpg", "tiny.png", "unreadable.jpg"}
    assert summary.size == 5
    listed = (tmp_path / "index" / "skipped.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(skipped)
    # a rerun resumes: nothing is extracted again and nothing is lost
    again = build_index(messy, tmp_path / "index", CONFIG)
    assert again.extract.done == 0 and again.extract.resumed == 5 and again.size == 5
    handle = open_index(tmp_path / "index")
    try:
        (best,) = search(handle, [messy / "good.jpg"])
        assert handle.names[int(best.ids[0])] == "good.jpg"
    finally:
        handle.close()


def test_empty_folder_and_other_extractor_config(tmp_path, messy):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        build_index(tmp_path / "empty", tmp_path / "index", CONFIG)
    build_index(messy, tmp_path / "index2", CONFIG)
    other = cfg.load(PipelineConfig, "demo", ["extractor.options.imsize=160"])
    with pytest.raises(UserError, match="another extractor config"):
        build_index(messy, tmp_path / "index2", other)


# ----------------------------------------------------------------------------------------------
# The command line: every bad input is one line on stderr, exit code 2, and nothing is written.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An index of four photos (demo preset: its chain is the bundled LoCoRe re-ranker), bad
    files beside it, and ground-truth files of every broken kind."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()[::2, ::2]).save(images / f"{name}.jpg")
    build_index(images, root / "ix", CONFIG)
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "afile.txt").write_text("a file, not a folder\n")
    (root / "empty").mkdir()
    (root / "outdir").mkdir()
    (root / "bad.yaml").write_text("search: [unclosed\n")
    (root / "ivf.yaml").write_text("index:\n  kind: hnsw\n")
    queries = root / "queries"
    queries.mkdir()
    Image.fromarray(data.coffee()[::2, ::2]).save(queries / "q0.jpg")
    entry = {"bbx": None, "easy": [1], "hard": [], "junk": []}
    imlist = ["astronaut", "chelsea", "coffee", "rocket"]
    gnds = {
        "garbage": np.random.default_rng(0).bytes(200),
        "truncated": pickle.dumps({"imlist": imlist, "qimlist": ["q0"], "gnd": [entry]})[:40],
        "json": json.dumps({"imlist": imlist, "qimlist": ["q0"], "gnd": [entry]}).encode(),
        "int": pickle.dumps(7),
        "short": pickle.dumps({"imlist": imlist, "qimlist": ["q0", "q0"], "gnd": [entry]}),
        "nolabels": pickle.dumps({"imlist": imlist, "qimlist": ["q0"], "gnd": [{"bbx": None}]}),
        "nomatch": pickle.dumps({"imlist": ["x", "y"], "qimlist": ["q0"], "gnd": [entry]}),
    }
    for name, raw in gnds.items():
        (root / f"gnd_{name}.pkl").write_bytes(raw)
    return root


def _search(*extra: str) -> list[str]:
    return ["search", "{root}/images/coffee.jpg", "--index", "{root}/ix", *extra]


def _eval(gnd: str, *extra: str, queries: str = "{root}/queries") -> list[str]:
    return [
        "eval",
        "--index",
        "{root}/ix",
        "--gnd",
        f"{{root}}/{gnd}",
        "--queries",
        queries,
        *extra,
    ]


def _rerank(queries: str = "{root}/queries") -> list[str]:
    return ["rerank", "--index", "{root}/ix", "--shortlist", "{root}/nn.pkl", "--queries", queries]


def _index(*extra: str) -> list[str]:
    return ["index", "--images", "{root}/images", "--out", "{root}/new_ix", *extra]


# (argv with {root} for the workspace, a word the one error line must hold)
CASES = [
    # search: queries, index, config
    (["search", "{root}/text.jpg", "--index", "{root}/ix"], "cannot be decoded"),
    (["search", "{root}/nothing.jpg", "--index", "{root}/ix"], "nothing.jpg"),
    (["search", "{root}/images/coffee.jpg", "--index", "{root}/nothing"], "not an index"),
    (["search", "{root}/images/coffee.jpg", "--index", "{root}/afile.txt"], "not an index"),
    (_search("--set", "x.y=1"), "unknown config key x"),
    (_search("--set", "search.topk"), "key.sub=value"),
    (_search("--config", "{root}/missing.yaml"), "does not exist"),
    (_search("--config", "nosuchpreset"), "unknown pipelines config"),
    (_search("--config", "{root}/bad.yaml"), "not valid YAML"),
    (_search("--config", "{root}/ivf.yaml"), "index section is fixed"),
    (_search("--set", "index.kind=hnsw"), "index section is fixed"),
    (_search("--set", "extractor.options.imsize=384"), "described like the index"),
    (_search("--set", "extractor.batch_size=0"), "batch_size"),
    (_search("--set", "search.show=0"), "search.show"),
    (_search("--topk", "0"), "search.topk"),
    (_search("--topk", "many"), "invalid int value"),
    (_search("--no-such-flag"), "unrecognized arguments"),
    # search: the query box
    (_search("--box", "1,2,3"), "four numbers"),
    (_search("--box", "nan,0,100,100"), "finite"),
    (_search("--box", "0,0,inf,inf"), "finite"),
    (_search("--box", "50,50,10,10"), "is empty"),
    (_search("--box", "5000,5000,6000,6000"), "lies outside the 300x200 px query"),
    (["search", "{root}/queries/q0.jpg", *_search("--box", "0,0,9,9")[1:]], "single query"),
    # search: outputs
    (_search("--out", "{root}/outdir"), "is a folder"),
    (_search("--grid", "{root}/outdir"), "is a folder"),
    (_search("--out", "{root}/afile.txt/r.jsonl"), "is a file"),
    # search: the re-ranking chain
    (_search("--rerank", "nope"), "not a re-ranker"),
    (_search("--rerank", ","), "names no stage"),
    (_search("--rerank", "locore", "--set", "search.rerank=[]"), "pass one of them"),
    (_search("--topk", "5", "--set", "search.topk=6"), "pass one"),
    (_search("--rerank", "locore", "--set", "search.rerank.3.options.alpha=1"), "holds 1 items"),
    (
        _search("--set", "search.rerank.1.options.checkpoint=vislang/locore_dinov2_base"),
        "768-D local descriptors but index",
    ),
    # index and extract: folders and sizes
    (["index", "--images", "{root}/missing", "--out", "{root}/o"], "does not exist"),
    (["index", "--images", "{root}/afile.txt", "--out", "{root}/o"], "is a file, not a folder"),
    (["index", "--images", "{root}/empty", "--out", "{root}/o"], "is empty"),
    (["index", "--images", "{root}/images", "--out", "{root}/afile.txt"], "is a file"),
    (_index("--set", "extractor.batch_size=0"), "extractor.batch_size"),
    (_index("--set", "extractor.batch_size=-3"), "extractor.batch_size"),
    (_index("--set", "extractor.num_workers=-1"), "num_workers"),
    (_index("--set", "extractor.name=nope"), "nope"),
    (_index("--config", "{root}/missing.yaml"), "does not exist"),
    (["extract", "--images", "{root}/afile.txt", "--out", "{root}/o"], "is a file, not a folder"),
    (["extract", "--images", "{root}/images", "--out", "{root}/afile.txt"], "is a file"),
    (["extract", "--images", "{root}/images", "--out", "{root}/o", "--shard", "3/2"], "0 <= i < N"),
    (_index("--set", "extractor.store_dtype=int8"), "store_dtype"),
    # eval: the ground truth and its folders
    (_eval("gnd_missing.pkl"), "does not exist"),
    (_eval("gnd_garbage.pkl"), "gnd_garbage.pkl"),
    (_eval("gnd_truncated.pkl"), "gnd_truncated.pkl"),
    (_eval("gnd_json.pkl"), "gnd_json.pkl"),
    (_eval("gnd_int.pkl"), "gnd_int.pkl"),
    (_eval("gnd_short.pkl"), "gnd_short.pkl"),
    (_eval("gnd_nolabels.pkl"), "gnd_nolabels.pkl"),
    (_eval("gnd_nomatch.pkl"), "first: x"),
    (_eval("gnd_short.pkl", "--out", "{root}/afile.txt"), "is a file"),
    (_eval("gnd_short.pkl", queries="{root}/afile.txt"), "is a file"),
    (_eval("gnd_short.pkl", "--config", "{root}/missing.yaml"), "does not exist"),
    # rerank
    (_rerank(), "nn.pkl"),
    (_rerank("{root}/afile.txt"), "is a file"),
    # flags a command has no use for are refused, never ignored
    (["bench", "index", "--config", "demo"], "unrecognized arguments"),
    (["bench", "rerank", "--set", "a=1"], "unrecognized arguments"),
    (["train"], "needs --config"),
    ([], "required"),
]


@pytest.mark.parametrize(
    ("argv", "expect"), CASES, ids=[f"{i:02d}-{' '.join(a[:1])}" for i, (a, _) in enumerate(CASES)]
)
def test_cli_bad_input_is_one_line_exit_2(workspace, capsys, argv, expect):
    """One line on stderr naming the problem, exit code 2, no traceback, nothing written."""
    before = _tree(workspace)
    code = main([a.format(root=workspace) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (argv, err)
    assert err.startswith("locore: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert expect in err, err
    assert _tree(workspace) == before


def _tree(root) -> dict[str, int]:
    """Every file and folder below ``root`` with its size (-1 for folders)."""
    return {
        str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_dir()
    }
