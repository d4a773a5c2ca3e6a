"""Every bad input is reported in one line; the rest is indexed and nothing written is lost."""

from __future__ import annotations

import io

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


def test_cli_errors_are_one_line_exit_2(messy, tmp_path, capsys):
    assert (
        main(
            [
                "index",
                "--images",
                str(messy),
                "--out",
                str(tmp_path / "ix"),
                "--set",
                "extractor.options.imsize=128",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cases = [
        ["search", str(messy / "text.jpg"), "--index", str(tmp_path / "ix")],
        ["search", str(messy / "good.jpg"), "--index", str(tmp_path / "nothing")],
        ["search", str(messy / "good.jpg"), "--index", str(tmp_path / "ix"), "--set", "x.y=1"],
        ["search", str(messy / "good.jpg"), "--index", str(tmp_path / "ix"), "--box", "1,2,3"],
        ["search", str(messy / "good.jpg"), "--index", str(tmp_path / "ix"), "--rerank", "nope"],
        ["index", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("locore: error: ") and "\n" not in err, err
        assert "Traceback" not in err
