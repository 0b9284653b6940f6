"""Metric values computed by hand; MostPop ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recdata.metrics import coverage, mostpop_ranks, rank_metrics


def test_rank_metrics_by_hand():
    ranks = [0, 2, 9, None]  # first place, third, tenth, missed
    m = rank_metrics(ranks, ks=(1, 5, 10), list_length=20)
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 0.75
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 4)
    assert m["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 4)
    with pytest.raises(ValueError):
        rank_metrics([])


def test_coverage():
    assert coverage([[0, 1], [1, 2]], catalog_size=10, ks=(1, 2)) == {"coverage@1": 0.2, "coverage@2": 0.3}


def test_mostpop_excludes_history_and_breaks_ties_by_index():
    popularity = np.array([5, 9, 9, 1, 0])
    ranks, lists = mostpop_ranks(popularity, targets=[2, 0, 1], excluded=[[1], [], [1]], top=3)
    assert lists[0] == [2, 0, 3] and ranks[0] == 0
    assert lists[1] == [1, 2, 0] and ranks[1] == 2
    assert ranks[2] is None  # an excluded target cannot be ranked
