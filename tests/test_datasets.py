"""Dataset loaders on tiny fake datasets written in the exact public layouts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from locore.benchmarks.datasets.gldv2 import image_path, load_gldv2
from locore.benchmarks.datasets.metric_learning import load_cub200, load_inshop, load_sop
from locore.benchmarks.datasets.revisitop import load_revisitop, read_gnd
from locore.core.errors import UserError
from locore.engine.metrics import evaluate_metric_learning, evaluate_revisited, ranks_from_scores


def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ----------------------------------------------------------------------------------------------
# Revisited Oxford / Paris (+1M)
# ----------------------------------------------------------------------------------------------
IMLIST = ["all_souls_000001", "all_souls_000002", "ashmolean_000003", "oxford_000004"]
QIMLIST = ["all_souls_000013", "ashmolean_000007"]


@pytest.fixture
def roxford(tmp_path: Path) -> Path:
    """``<root>/roxford5k/{gnd_roxford5k.pkl, jpg/}``; gnd fields mix lists and arrays."""
    folder = tmp_path / "roxford5k"
    gnd = {
        "imlist": IMLIST,
        "qimlist": QIMLIST,
        "gnd": [
            {"bbx": [2.7, 3.9, 17.2, 15.99], "easy": [0], "hard": np.array([1]), "junk": [2]},
            {"bbx": np.array([0.0, 0.0, 8.5, 8.5]), "easy": np.array([2]), "hard": [], "junk": []},
        ],
    }
    _pickle(folder / "gnd_roxford5k.pkl", gnd)
    rng = np.random.default_rng(0)
    for name in IMLIST + QIMLIST:
        # PNG data under the .jpg name keeps decoded pixels exact for the crop check
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        (folder / "jpg").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / "jpg" / f"{name}.jpg", format="PNG")
    return tmp_path


def test_revisitop_layout(roxford: Path):
    ds = load_revisitop(roxford, "roxford5k")
    assert ds.name == "roxford5k" and ds.root == roxford / "roxford5k"
    assert [p.name for p in ds.database] == [f"{n}.jpg" for n in IMLIST]
    assert [p.name for p in ds.queries] == [f"{n}.jpg" for n in QIMLIST]
    assert ds.gnd[0] == {"bbx": (2.7, 3.9, 17.2, 15.99), "easy": [0], "hard": [1], "junk": [2]}
    assert ds.gnd[1]["easy"] == [2] and isinstance(ds.gnd[1]["easy"], list)
    # the dataset is directly usable by the metric (a full ranking per query)
    ranks = np.array([[0, 1, 2, 3], [2, 0, 1, 3]]).T
    assert evaluate_revisited(ranks, ds.gnd)["medium"]["map"] == pytest.approx(100.0)


def test_query_crop_truncates_with_exclusive_ends(roxford: Path):
    ds = load_revisitop(roxford, "roxford5k")
    assert ds.query_crop(0) == (2, 3, 17, 15)
    full = ds.load_query(0, crop=False)
    crop = ds.load_query(0)
    assert crop.shape == (15 - 3, 17 - 2, 3)
    np.testing.assert_array_equal(crop, full[3:15, 2:17])
    assert list(ds.iter_queries())[1] == (ds.queries[1], (0.0, 0.0, 8.5, 8.5))


def test_revisitop_with_1m_distractors(roxford: Path):
    listing = ["000/aaa.jpg", "001/bbb.jpg"]
    _touch(roxford / "revisitop1m" / "revisitop1m.txt", ("\n".join(listing) + "\n").encode())
    for line in listing:
        _touch(roxford / "revisitop1m" / "jpg" / line)
    ds = load_revisitop(roxford, "roxford5k+1m")
    assert ds.name == "roxford5k+1m" and len(ds.database) == len(IMLIST) + 2
    # the 5k database first, then the distractors in list order (the official +1M id order)
    assert ds.database[len(IMLIST)] == roxford / "revisitop1m" / "jpg" / "000" / "aaa.jpg"
    assert ds.database[-1].name == "bbb.jpg"
    assert ds.db_names == [*IMLIST, "revisitop1m/000/aaa", "revisitop1m/001/bbb"]
    assert ds.query_names == QIMLIST


def test_revisitop_missing_files_name_the_file_and_source(tmp_path: Path, roxford: Path):
    with pytest.raises(UserError, match=r"gnd_rparis6k\.pkl.*cmp\.felk\.cvut\.cz/revisitop"):
        load_revisitop(tmp_path / "nowhere", "rparis6k")
    with pytest.raises(UserError, match=r"revisitop1m\.txt.*ptak\.felk\.cvut\.cz"):
        load_revisitop(roxford, "roxford5k", with_1m=True)
    (roxford / "roxford5k" / "jpg" / "oxford_000004.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of 6 .*oxford_000004\.jpg.*oxbuild_images"):
        load_revisitop(roxford, "roxford5k")
    assert len(load_revisitop(roxford, "roxford5k", verify=False).database) == 4
    with pytest.raises(UserError, match="unknown Revisited dataset"):
        load_revisitop(roxford, "oxford5k")


def test_corrupt_gnd_is_a_user_error(tmp_path: Path):
    path = tmp_path / "gnd_roxford5k.pkl"
    _pickle(
        path, {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}
    )
    with pytest.raises(UserError, match="outside the 1-image imlist"):
        read_gnd(path)
    _pickle(path, {"imlist": ["a"]})
    with pytest.raises(UserError, match="qimlist"):
        read_gnd(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot be read"):
        read_gnd(path)


# ----------------------------------------------------------------------------------------------
# GLDv2
# ----------------------------------------------------------------------------------------------
INDEX_IDS = ["aaa0000000000001", "bbb0000000000002", "ccc0000000000003"]


def _write_cvdf(root: Path, solution_rows: list[str]) -> None:
    _touch(root / "index.csv", ("id\n" + "\n".join(INDEX_IDS) + "\n").encode())
    _touch(
        root / "retrieval_solution_v2.1.csv",
        ("id,images,Usage\n" + "\n".join(solution_rows)).encode(),
    )
    for i in INDEX_IDS:
        _touch(image_path(root / "index", i))


def test_gldv2_cvdf_csv_layout(tmp_path: Path):
    rows = [
        "fff0000000000009,ccc0000000000003,Private",
        "eee0000000000008,aaa0000000000001 ccc0000000000003,Public",
        "ddd0000000000007,None,Ignored",
    ]
    _write_cvdf(tmp_path, rows)
    for q in ("fff0000000000009", "eee0000000000008"):
        _touch(image_path(tmp_path / "test", q))
    ds = load_gldv2(tmp_path)
    # public queries first, then private; Ignored dropped
    assert [p.stem for p in ds.queries] == ["eee0000000000008", "fff0000000000009"]
    assert ds.gnd == [{"ok": [0, 2]}, {"ok": [2]}]
    assert ds.splits == {"public": (0, 1), "private": (1, 2)}
    assert ds.database[1] == tmp_path / "index" / "b" / "b" / "b" / "bbb0000000000002.jpg"
    assert ds.query_names == ["eee0000000000008", "fff0000000000009"] and ds.db_names == INDEX_IDS


def test_gldv2_errors(tmp_path: Path):
    with pytest.raises(UserError, match=r"retrieval_solution_v2\.1\.csv.*google-landmark"):
        load_gldv2(tmp_path)
    _write_cvdf(tmp_path, ["eee0000000000008,zzz0000000000000,Public"])
    with pytest.raises(UserError, match="zzz0000000000000 missing from index.csv"):
        load_gldv2(tmp_path, verify=False)
    _write_cvdf(tmp_path, ["eee0000000000008,aaa0000000000001,Public"])
    with pytest.raises(UserError, match="GLDv2 test images"):
        load_gldv2(tmp_path)


def test_gldv2_ames_layout(tmp_path: Path):
    folder = tmp_path / "gldv2-test"
    _pickle(folder / "gnd_gldv2-test.pkl", {"gnd": [{"ok": np.array([1])}, {"ok": [0, 1]}]})
    _touch(folder / "test_query.txt", b"test/q1.jpg,0,10,10\ntest/q2.jpg,0,10,10\n")
    _touch(folder / "test_gallery.txt", b"index/d1.jpg,0,10,10\nindex/d2.jpg,0,10,10\n")
    images = tmp_path / "images"
    ds = load_gldv2(tmp_path, images_root=images, verify=False)
    assert ds.queries == [images / "test" / "q1.jpg", images / "test" / "q2.jpg"]
    assert ds.gnd == [{"ok": [1]}, {"ok": [0, 1]}] and ds.splits["public"] == (0, 2)
    assert ds.db_names == ["index/d1.jpg", "index/d2.jpg"]
    (folder / "test_gallery.txt").unlink()
    with pytest.raises(UserError, match="test_gallery.txt"):
        load_gldv2(tmp_path, verify=False)


# ----------------------------------------------------------------------------------------------
# SOP, In-Shop, CUB-200
# ----------------------------------------------------------------------------------------------
def test_sop_split_file(tmp_path: Path):
    folder = tmp_path / "Stanford_Online_Products"
    lines = [
        "image_id class_id super_class_id path",
        "1 11319 1 bicycle_final/111_0.JPG",
        "2 11319 1 bicycle_final/111_1.JPG",
        "3 11320 1 bicycle_final/112_0.JPG",
    ]
    _touch(folder / "Ebay_test.txt", "\n".join(lines).encode())
    for line in lines[1:]:
        _touch(folder / line.split()[3])
    ds = load_sop(tmp_path)
    assert ds.name == "sop" and ds.self_retrieval and ds.queries == ds.database
    np.testing.assert_array_equal(ds.query_labels, [11319, 11319, 11320])
    assert ds.db_names[0] == "bicycle_final/111_0.JPG"
    with pytest.raises(UserError, match=r"Ebay_train\.txt.*cvgl\.stanford\.edu"):
        load_sop(tmp_path, split="train")
    # end to end with the metric: each image ranks itself, then the rest by id
    scores = -np.abs(np.arange(3)[:, None] - np.arange(3)[None, :]).astype(float)
    ranks = ranks_from_scores(scores)
    out = evaluate_metric_learning(ranks, ds.query_labels, ds.db_labels, (1, 2), exclude_self=True)
    # query 2 (class 11320) has no other image: excluded from every mean, and counted
    assert out["recall@1"] == pytest.approx(100.0) and out["map@r"] == pytest.approx(100.0)
    assert out["n_queries_without_positives"] == 1


def test_inshop_partition_file(tmp_path: Path):
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "query"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "gallery"),
        ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "gallery"),
        ("img/MEN/Denim/id_00000009/01_1_front.jpg", "id_00000009", "train"),
    ]
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    text += "".join(f"{a:<60}{b:<16}{c}\n" for a, b, c in rows)
    _touch(tmp_path / "Eval" / "list_eval_partition.txt", text.encode())
    for name, _, _ in rows:
        _touch(tmp_path / "Img" / name)
    ds = load_inshop(tmp_path)
    assert ds.name == "inshop" and not ds.self_retrieval
    assert ds.queries == [tmp_path / "Img" / rows[0][0]]
    assert [p.name for p in ds.database] == ["02_2_side.jpg", "01_1_front.jpg"]
    assert ds.query_labels[0] == ds.db_labels[0] != ds.db_labels[1]
    assert ds.query_names == [rows[0][0]]
    assert load_inshop(tmp_path, split="train").query_names == [rows[3][0]]
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match=r"list_eval_partition\.txt.*DeepFashion"):
        load_inshop(tmp_path)


def test_cub200_class_split(tmp_path: Path):
    folder = tmp_path / "CUB_200_2011"
    images = {1: ("001.A/a_1.jpg", 1), 2: ("100.B/b_1.jpg", 100), 3: ("101.C/c_1.jpg", 101)}
    images[4] = ("200.D/d_1.jpg", 200)
    _touch(folder / "images.txt", "".join(f"{i} {p}\n" for i, (p, _) in images.items()).encode())
    _touch(
        folder / "image_class_labels.txt",
        "".join(f"{i} {c}\n" for i, (_, c) in images.items()).encode(),
    )
    for p, _ in images.values():
        _touch(folder / "images" / p)
    test = load_cub200(tmp_path)
    train = load_cub200(tmp_path, split="train")
    np.testing.assert_array_equal(test.query_labels, [101, 200])
    np.testing.assert_array_equal(train.db_labels, [1, 100])
    assert test.db_names == ["101.C/c_1.jpg", "200.D/d_1.jpg"]
    assert test.database[0] == folder / "images" / "101.C" / "c_1.jpg" and test.self_retrieval
    (folder / "images" / "200.D" / "d_1.jpg").unlink()
    with pytest.raises(UserError, match=r"cub200 images.*caltech"):
        load_cub200(tmp_path)
