"""Training lists (reference-spec §5.2-5.3): neighbours, caps, injection, shuffling, labels."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import K, N, write_features

from locore.core.errors import UserError
from locore.indexing.shortlist import Shortlist
from locore.rerank.train.data import (
    DataConfig,
    ListDataset,
    nearest_neighbours,
    read_labels,
    read_pairs,
)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("feats"))


def _data(features, **kw):
    kw = {"list_length": 6, "num_local": K, "labels": str(features / "labels.txt"), **kw}
    return DataConfig(features=str(features), **kw)


def test_lists_are_the_nearest_neighbours_without_the_query(features):
    plain = ListDataset(_data(features, shuffle_gallery=False), seed=1)
    for i in range(N):
        ids, labels = plain.list_ids(i)
        assert i not in ids and len(set(ids)) == 6
        sims = plain.globals[ids] @ plain.globals[i]
        others = np.delete(plain.globals @ plain.globals[i], i)
        assert (np.diff(sims) <= 1e-6).all() and sims[-1] >= np.sort(others)[-6] - 1e-6
        np.testing.assert_array_equal(labels, plain.positives(i)[ids])


def test_gallery_shuffling_differs_per_draw_and_is_reproducible(features):
    plain = ListDataset(_data(features, shuffle_gallery=False), seed=1)
    shuffled = ListDataset(_data(features), seed=1)
    ids, _ = plain.list_ids(0)
    a, b = shuffled.list_ids(0, draw=0), shuffled.list_ids(0, draw=1)
    assert sorted(a[0]) == sorted(ids) == sorted(b[0])
    assert any((shuffled.list_ids(0, d)[0] != a[0]).any() for d in range(1, 5))
    np.testing.assert_array_equal(shuffled.list_ids(0, draw=0)[0], a[0])
    np.testing.assert_array_equal(a[1], plain.positives(0)[a[0]])


def test_positive_cap_and_injection(features):
    capped = ListDataset(_data(features, shuffle_gallery=False, max_positives=1), seed=1)
    assert all(capped.list_ids(i)[1].sum() <= 1 for i in range(N))
    injected = ListDataset(_data(features, min_positives=3), seed=1)
    for i in range(N):
        ids, labels = injected.list_ids(i)
        assert labels.sum() == 3 and i not in ids and len(set(ids)) == 6


def test_shortlist_file_gives_the_same_lists(features, tmp_path):
    computed = ListDataset(_data(features, shuffle_gallery=False), seed=0)
    ids = nearest_neighbours(computed.globals, N - 1)
    with_self = np.concatenate([np.arange(N)[:, None], ids], 1)  # official files may hold i
    Shortlist(with_self, np.zeros(with_self.shape, np.float32)).save(tmp_path / "nn")
    loaded = ListDataset(_data(features, shuffle_gallery=False, shortlist=str(tmp_path / "nn")))
    for i in range(N):
        np.testing.assert_array_equal(loaded.list_ids(i)[0], computed.list_ids(i)[0])


def test_batch_shapes_and_labels(features):
    data = ListDataset(_data(features, num_local=5), seed=0)
    x = data.batch(np.array([0, 3]), np.array([7, 8]))
    assert x.query_local.shape == (2, 5, 112) and x.gallery_local.shape == (2, 6, 5, 112)
    assert x.query_global.shape == (2, 1280) and x.gallery_global.shape == (2, 6, 1280)
    assert x.positive_mask.shape == (2, 6) and x.gallery_scales.dtype.is_floating_point is False
    np.testing.assert_array_equal(x.positive_mask[1].numpy(), data.list_ids(3, 8)[1])
    assert not x.query_mask.any()  # padding sits in the last local, beyond num_local=5
    without = ListDataset(_data(features, use_global=False), seed=0).batch(np.array([0]))
    assert without.query_global is None and without.gallery_global is None


def test_pairs_equal_to_the_classes_give_the_same_lists(features, tmp_path):
    """Every same-class pair as a pairs file (stems, both orders, a self pair) = the classes."""
    by_class = ListDataset(_data(features), seed=3)
    lines = [
        f"img{i},img{j}.jpg"
        for i in range(N)
        for j in range(i, N)
        if by_class.labels[i] == by_class.labels[j]
    ]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    config = _data(features, labels="", pairs=str(tmp_path / "pairs.txt"))
    by_pairs = ListDataset(config, seed=3)
    for i in range(N):
        for draw in (0, 5):
            a, b = by_class.list_ids(i, draw), by_pairs.list_ids(i, draw)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_pairs_are_symmetric_and_not_transitive(tmp_path):
    (tmp_path / "p.txt").write_text("a,b\nb,c\n\n")
    partners = read_pairs(tmp_path / "p.txt", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert [p.tolist() for p in partners] == [[1], [0, 2], [1], []]
    (tmp_path / "p.txt").write_text("a,zz\n")
    with pytest.raises(UserError, match=r"p.txt:1 names 'zz', which is not in the store"):
        read_pairs(tmp_path / "p.txt", ["a.jpg"])
    (tmp_path / "p.txt").write_text("a;b\n")
    with pytest.raises(UserError, match=r"p.txt:1 is not two comma-separated fields"):
        read_pairs(tmp_path / "p.txt", ["a.jpg"])


def test_bad_inputs_are_user_errors(features, tmp_path):
    with pytest.raises(UserError, match="lower data.list_length"):
        ListDataset(_data(features, list_length=20))
    with pytest.raises(UserError, match="lower data.num_local"):
        ListDataset(_data(features, num_local=9))
    (tmp_path / "labels.txt").write_text("img0,1\n")
    with pytest.raises(UserError, match="no label for image 'img1.jpg'"):
        read_labels(tmp_path / "labels.txt", ["img0.jpg", "img1.jpg"])
    with pytest.raises(UserError, match="unknown data.source"):
        DataConfig(source="web")
    with pytest.raises(UserError, match="set data.features"):
        ListDataset(DataConfig())
    with pytest.raises(UserError, match="set exactly one of data.labels"):
        ListDataset(_data(features, pairs=str(tmp_path / "labels.txt")))
