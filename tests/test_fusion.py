"""Fusion of global and local scores (reference-spec §6.5) and the stable ranking sort (P20)."""

import math

import numpy as np
import pytest

from locore.rerank.fusion import fuse, rank_desc, sigmoid


def test_fuse_matches_the_formula_by_hand():
    g = np.array([[0.9, 0.2]])
    local = np.array([[-3.0, 7.0]])
    out = fuse(g, local, alpha=0.3, temp=0.5)
    expected = [
        0.3 * 0.9 + 0.7 / (1 + math.exp(1.5)),
        0.3 * 0.2 + 0.7 / (1 + math.exp(-3.5)),
    ]
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-15)
    assert out.dtype == np.float64


def test_fuse_limits_keep_the_global_ranking():
    rng = np.random.default_rng(0)
    g = np.sort(rng.random((4, 20)), axis=1)[:, ::-1]
    local = rng.normal(size=(4, 20)) * 10
    # alpha = 1 ignores the model; temp = 0 makes its term the constant sigmoid(0) = 0.5.
    np.testing.assert_array_equal(fuse(g, local, 1.0, 0.7), g)
    np.testing.assert_allclose(
        fuse(g, local, 0.4, 0.0), 0.4 * g + 0.3, rtol=4 * np.finfo(float).eps
    )
    identity = np.tile(np.arange(20), (4, 1))
    np.testing.assert_array_equal(rank_desc(fuse(g, local, 0.4, 0.0)), identity)


def test_fuse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        fuse(np.zeros((2, 3)), np.zeros((2, 4)), 0.5, 0.1)


def test_sigmoid_saturates_without_overflow():
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with np.errstate(over="raise"):
        out = sigmoid(x)
    np.testing.assert_allclose(out[1:4], 1 / (1 + np.exp(-x[1:4])), rtol=1e-13)
    assert out[0] == 0.0 and out[2] == 0.5 and out[4] == 1.0


def test_rank_desc_is_descending_and_keeps_ties_in_incoming_order():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(rank_desc(scores)[0], [1, 4, 0, 2, 5, 3])
    np.testing.assert_array_equal(rank_desc(scores)[1], np.arange(6))
