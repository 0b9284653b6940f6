"""Readers: RecBole atomic files, CSV/Parquet with a column mapping, Amazon JSONL; errors name file/line/column."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from recdata.errors import DataFormatError
from recdata.sources import ml100k_paths, read_amazon, read_ml100k, read_recbole, read_table


def write(path, text):
    path.write_text(text)
    return path


def test_recbole_reader_reads_fields(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t100\n1\t11\t5\t90\n")
    item = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\n10\tAlpha\n11\tBeta\n")
    raw = read_recbole(inter, item)
    assert raw.interactions.to_dict("records")[1] == {"user_id": "1", "item_id": "11", "timestamp": 90.0, "rating": 5.0}
    assert raw.items["title"].tolist() == ["Alpha", "Beta"]


def test_recbole_bad_number_names_file_line_column(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t10\t100\n1\t11\tsoon\n")
    item = write(tmp_path / "x.item", "item_id:token\ttitle:token_seq\n10\tA\n")
    with pytest.raises(DataFormatError) as info:
        read_recbole(inter, item)
    message = str(info.value)
    assert "x.inter" in message and "line 3" in message and "'timestamp'" in message and "'soon'" in message


def test_recbole_wrong_field_count_and_missing_header(tmp_path):
    item = write(tmp_path / "x.item", "item_id:token\ttitle:token_seq\n10\tA\n")
    bad = write(tmp_path / "a.inter", "user_id:token\titem_id:token\n1\t10\textra\n")
    with pytest.raises(DataFormatError, match=r"a.inter, line 2: expected 2 tab-separated fields, found 3"):
        read_recbole(bad, item)
    no_user = write(tmp_path / "b.inter", "uid:token\titem_id:token\n1\t10\n")
    with pytest.raises(DataFormatError, match=r"b.inter, line 1: header has no 'user_id'"):
        read_recbole(no_user, item)
    with pytest.raises(DataFormatError, match="file not found"):
        read_recbole(tmp_path / "missing.inter", item)


def test_table_reader_with_column_mapping_csv_and_parquet(tmp_path):
    pd.DataFrame({"uid": ["a", "a"], "iid": ["x", "y"], "ts": [1, 2]}).to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"iid": ["x", "y"], "name": ["X", "Y"]}).to_parquet(tmp_path / "m.parquet")
    raw = read_table(tmp_path / "i.csv", tmp_path / "m.parquet", {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "title": "name"})
    assert raw.interactions["timestamp"].tolist() == [1.0, 2.0]
    assert raw.items.set_index("item_id")["title"].to_dict() == {"x": "X", "y": "Y"}


def test_table_reader_errors(tmp_path):
    (tmp_path / "i.csv").write_text("uid,iid,ts\na,x,1\na,y,later\n")
    (tmp_path / "m.csv").write_text("iid,name\nx,X\n")
    mapping = {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "title": "name"}
    with pytest.raises(DataFormatError, match=r"i.csv, line 3, column 'ts': expected a number, got 'later'"):
        read_table(tmp_path / "i.csv", tmp_path / "m.csv", mapping)
    with pytest.raises(DataFormatError, match=r"missing column 'user'"):
        read_table(tmp_path / "i.csv", tmp_path / "m.csv", {**mapping, "user_id": "user"})
    (tmp_path / "i.xlsx").write_text("")
    with pytest.raises(DataFormatError, match="unsupported extension"):
        read_table(tmp_path / "i.xlsx", tmp_path / "m.csv", mapping)


def test_amazon_reader_and_bad_json_line(tmp_path):
    reviews = tmp_path / "r.jsonl"
    reviews.write_text("\n".join(json.dumps(r) for r in [
        {"reviewerID": "u1", "asin": "A", "unixReviewTime": 5, "overall": 4.0},
        {"reviewerID": "u1", "asin": "B", "unixReviewTime": 6},
    ]) + "\n")
    meta = tmp_path / "m.jsonl"
    meta.write_text(json.dumps({"asin": "A", "title": "Alpha"}) + "\n" + json.dumps({"asin": "B", "title": ""}) + "\n")
    raw = read_amazon(reviews, meta)
    assert raw.interactions["item_id"].tolist() == ["A", "B"]
    assert raw.items["item_id"].tolist() == ["A"]  # untitled items cannot be generated
    reviews.write_text(json.dumps({"reviewerID": "u1", "asin": "A", "unixReviewTime": 5}) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"r.jsonl, line 2: invalid JSON"):
        read_amazon(reviews, meta)
    reviews.write_text(json.dumps({"asin": "A", "unixReviewTime": 5}) + "\n")
    with pytest.raises(DataFormatError, match=r"line 1, column 'reviewerID': missing user field"):
        read_amazon(reviews, meta)


def test_embedded_ml100k():
    inter, _item = ml100k_paths()
    assert inter.name == "ml-100k.inter"
    raw = read_ml100k()
    assert len(raw.interactions) == 100_000
    assert raw.interactions["user_id"].nunique() == 943
    assert len(raw.items) == 1682
