"""Re-ranking chains: stages in order, each reading the previous ranking and its scores."""

import numpy as np
import pytest
import rerank_helpers as helpers
import torch

from locore.core.errors import UserError
from locore.engine.config import StageConfig
from locore.indexing.shortlist import Shortlist
from locore.rerank.base import Reranker, RerankResult
from locore.rerank.chain import build_chain
from locore.rerank.locore.model import build_model
from locore.rerank.locore.reranker import LocoreOptions, LocoreReranker
from locore.rerank.superglobal import SuperGlobalReranker

SG = StageConfig("superglobal", {"m": 30, "k": 3, "device": "cpu", "dtype": "float64"})


def locore_stage(model=None) -> LocoreReranker:
    options = LocoreOptions(num_local=4, topk=25, window=8, stride=3, alpha=0.3, temp=0.5)
    return LocoreReranker(model or helpers.StandInModel(), options)


def test_superglobal_then_locore_feeds_each_stage_the_previous_ranking():
    queries, shortlist, database = helpers.collection(num_q=4)
    locore = locore_stage()
    final, stages = build_chain([SG, locore]).run(queries, shortlist, database)
    assert len(stages) == 2
    sg = SuperGlobalReranker(m=30, k=3, device="cpu", dtype="float64").rerank(
        queries, shortlist, database
    )
    np.testing.assert_array_equal(stages[0].ids, sg.ids)
    np.testing.assert_array_equal(stages[0].scores, sg.scores)
    # LoCoRe fuses with SuperGlobal's scores, not with the first-stage similarities.
    manual = locore.rerank(queries, Shortlist(ids=sg.ids, sims=sg.scores), database)
    np.testing.assert_array_equal(stages[1].ids, manual.ids)
    np.testing.assert_array_equal(stages[1].before, sg.ids)
    np.testing.assert_array_equal(final.ids, manual.ids)
    np.testing.assert_array_equal(final.scores, manual.scores)
    np.testing.assert_array_equal(final.before, shortlist.ids)
    from_first_stage = locore.rerank(queries, shortlist, database)
    assert not np.array_equal(from_first_stage.ids, final.ids)


def test_locore_alone_and_empty_chain():
    queries, shortlist, database = helpers.collection(num_q=2)
    locore = locore_stage()
    final, stages = build_chain([locore]).run(queries, shortlist, database)
    np.testing.assert_array_equal(final.ids, locore.rerank(queries, shortlist, database).ids)
    final, stages = build_chain([]).run(queries, shortlist, database)
    assert stages == []
    np.testing.assert_array_equal(final.ids, shortlist.ids)
    np.testing.assert_array_equal(final.scores, shortlist.sims)


def test_stage_specs_in_every_accepted_form():
    queries, shortlist, database = helpers.collection(num_q=2)
    options = dict(SG.options)
    forms = [SG, ("superglobal", options), {"name": "superglobal", "options": options}]
    specs = [f if not isinstance(f, dict) else StageConfig(**f) for f in forms]
    results = [build_chain([s]).run(queries, shortlist, database)[0] for s in specs]
    for other in results[1:]:
        np.testing.assert_array_equal(other.ids, results[0].ids)
    assert build_chain(["superglobal"]).stages[0].m == 400


def test_bad_specs_are_user_errors():
    with pytest.raises(UserError, match="unknown re-ranker"):
        build_chain(["supreglobal"])
    with pytest.raises(UserError, match="unknown option 'kk'"):
        build_chain([("superglobal", {"kk": 3})])
    with pytest.raises(UserError, match="must be a mapping"):
        build_chain([("superglobal", [3])])
    with pytest.raises(UserError, match="must be a name"):
        build_chain([42])


def test_superglobal_and_a_saved_micro_checkpoint_through_the_registry(tmp_path):
    torch.manual_seed(0)
    model = build_model("micro", local_dim=helpers.DIM, global_dim=helpers.GLOBAL_DIM, num_layers=1)
    model.save_pretrained(tmp_path / "micro")
    queries, shortlist, database = helpers.collection(num_q=3)
    locore = StageConfig(
        "locore",
        {
            "checkpoint": str(tmp_path / "micro"),
            "device": "cpu",
            "num_local": 4,
            "topk": 20,
            "window": 7,
            "stride": 3,
            "alpha": 0.0,
            "temp": 1.0,
        },
    )
    final, (sg, _) = build_chain([SG, locore]).run(queries, shortlist, database)
    assert not np.array_equal(final.ids[:, :20], sg.ids[:, :20])  # LoCoRe re-ordered
    np.testing.assert_array_equal(final.ids[:, 20:], sg.ids[:, 20:])
    options = LocoreOptions(num_local=4, topk=20, window=7, stride=3, alpha=0.0, temp=1.0)
    expected = LocoreReranker(model, options).rerank(
        queries, Shortlist(ids=sg.ids, sims=sg.scores), database
    )
    np.testing.assert_array_equal(final.ids, expected.ids)
    np.testing.assert_allclose(final.scores, expected.scores, rtol=0, atol=1e-6)


class Recorder(Reranker):
    """Reverses the order it receives and records what the chain handed it."""

    name = "recorder"

    def __init__(self, partitions_junk: bool):
        self.partitions_junk = partitions_junk
        self.seen = []

    def rerank(self, queries, shortlist, database):
        self.seen.append((shortlist.ids.copy(), shortlist.sims.copy(), queries.junk))
        ids, sims = shortlist.ids[:, ::-1].copy(), shortlist.sims[:, ::-1].copy()
        return RerankResult(ids=ids, scores=sims, before=shortlist.ids)


def test_the_chain_moves_junk_before_every_stage_that_asks_and_only_those():
    queries, shortlist, database = helpers.collection(num_q=2)
    queries.junk = [set(shortlist.ids[0, [1, 4]].tolist()), set()]
    keep, first, second = Recorder(False), Recorder(True), Recorder(True)
    build_chain([keep, first, second]).run(queries, shortlist, database)
    # A stage that keeps junk sees the ranking untouched and no junk sets.
    ids, sims, junk = keep.seen[0]
    np.testing.assert_array_equal(ids, shortlist.ids)
    assert junk is None
    # The next one sees the reversed ranking with junk moved to the end, similarities with it.
    reversed_ids, reversed_sims = shortlist.ids[:, ::-1], shortlist.sims[:, ::-1]
    ids, sims, junk = first.seen[0]
    assert junk is queries.junk
    is_junk = np.isin(reversed_ids[0], list(queries.junk[0]))
    want = np.concatenate([reversed_ids[0][~is_junk], reversed_ids[0][is_junk]])
    np.testing.assert_array_equal(ids[0], want)
    np.testing.assert_array_equal(
        sims[0], np.concatenate([reversed_sims[0][~is_junk], reversed_sims[0][is_junk]])
    )
    np.testing.assert_array_equal(ids[1], reversed_ids[1])
    # Its reversal put junk first again: the chain moves it back for the stage after.
    ids, _, _ = second.seen[0]
    assert set(ids[0, -2:].tolist()) == queries.junk[0]
