"""Preparation: RecBole-identical leave-one-out split, temporal split, k-core, titles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recdata.prep import PreparedData, PrepConfig, disambiguate_titles, k_core, prepare
from recdata.sources import RawData


def raw_fixture() -> RawData:
    # user a: timestamps with a tie (items 3 and 1 at t=20, file order 3 then 1); user b: 3 items; user c: 2 items.
    rows = [
        ("a", "2", 10.0, 5.0), ("b", "1", 5.0, 1.0), ("a", "3", 20.0, 4.0), ("a", "1", 20.0, 3.0),
        ("c", "4", 1.0, 5.0), ("a", "4", 40.0, 5.0), ("b", "2", 6.0, 5.0), ("a", "5", 30.0, 2.0),
        ("b", "3", 7.0, 4.0), ("c", "1", 2.0, 5.0),
    ]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    items = pd.DataFrame({"item_id": ["1", "2", "3", "4", "5"], "title": ["One", "Two", "Two", "Four", " Five  &amp; Six "],
                          "release_year": ["1990", "1991", "1991", "x", "1995"]})
    return RawData(inter, items, name="fixture")


def ids(data: PreparedData, user: str) -> list[str]:
    seq = data.sequences[data.users.index(user)]
    return [data.catalog.item_ids[i] for i in seq]


def test_loo_split_matches_recbole_protocol():
    """RecBole LS valid_and_test, order TO: stable time sort (file order breaks ties), last = test, previous = valid."""
    data = prepare(raw_fixture())
    assert ids(data, "a") == ["2", "3", "1", "5", "4"]
    a = data.users.index("a")
    test = {(int(u), int(p)) for u, p in data.splits["test"]}
    valid = {(int(u), int(p)) for u, p in data.splits["valid"]}
    train = {(int(u), int(p)) for u, p in data.splits["train"]}
    assert (a, 4) in test and (a, 3) in valid
    assert {(a, 1), (a, 2)} <= train and (a, 0) not in train  # the first item has no history
    b = data.users.index("b")
    assert (b, 2) in test and (b, 1) in valid and not any(u == b for u, _ in train)
    c = data.users.index("c")  # two interactions: RecBole gives no valid/test item, both are training
    assert not any(u == c for u, _ in test | valid) and (c, 1) in train
    assert data.train_lengths.tolist()[a] == 3 and data.train_lengths.tolist()[c] == 2
    assert data.history(a, 4).tolist() == data.sequences[a][:4].tolist()


def test_titles_cleaned_year_appended_and_disambiguated():
    data = prepare(raw_fixture())
    titles = dict(zip(data.catalog.item_ids, data.catalog.titles, strict=True))
    assert titles == {"1": "One (1990)", "2": "Two (1991)", "3": "Two (1991) #2", "4": "Four", "5": "Five & Six (1995)"}
    assert disambiguate_titles(["A", "A", "A #2"]) == ["A", "A #3", "A #2"]


def test_train_popularity_counts_training_part_only():
    data = prepare(raw_fixture())
    pop = dict(zip(data.catalog.item_ids, data.train_popularity().tolist(), strict=True))
    # a: 2,3,1 are training; b: 1; c: 4,1
    assert pop == {"1": 3, "2": 1, "3": 1, "4": 1, "5": 0}


def test_rating_threshold_and_k_core():
    data = prepare(raw_fixture(), PrepConfig(rating_threshold=4.0))
    assert "5" not in data.catalog.item_ids and ids(data, "b") == ["2", "3"]
    frame = pd.DataFrame({"user_id": list("aaabbc"), "item_id": list("xyzxyx")})
    kept = k_core(frame, user_core=2, item_core=2)
    # c has one interaction; after dropping c, x still has 2, z has 1 -> dropped; then a has x,y (2) ok
    assert sorted(map(tuple, kept.to_numpy().tolist())) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]


def test_temporal_split_uses_global_time():
    data = prepare(raw_fixture(), PrepConfig(split="temporal", temporal_ratios=(0.6, 0.2, 0.2)))
    stamps = sorted(raw_fixture().interactions["timestamp"])
    cut_valid = stamps[int(len(stamps) * 0.6)]
    for _user, position in data.splits["train"]:
        assert position >= 1
    a = data.users.index("a")
    # a's times: 10, 20, 20, 30, 40; cuts at 20 (valid) and 30 (test): train length 1, valid 1-2, test 3-4
    assert cut_valid == 20.0 and data.train_lengths[a] == 1
    assert {int(p) for u, p in data.splits["valid"] if u == a} == {1, 2}
    assert {int(p) for u, p in data.splits["test"] if u == a} == {3, 4}
    with pytest.raises(ValueError, match="sum to 1"):
        prepare(raw_fixture(), PrepConfig(split="temporal", temporal_ratios=(0.5, 0.2, 0.2)))


def test_save_and_load_roundtrip(tmp_path):
    data = prepare(raw_fixture())
    data.save(tmp_path / "d")
    back = PreparedData.load(tmp_path / "d")
    assert back.fingerprint == data.fingerprint and back.catalog.titles == data.catalog.titles
    for a, b in zip(back.sequences, [data.sequences[data.users.index(u)] for u in back.users], strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="prunerec data"):
        PreparedData.load(tmp_path)
