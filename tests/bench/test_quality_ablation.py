"""The quality ablation's smoke form: every variant trained and scored on the same users beside SASRec and
MostPop, the best combination made of the levers that helped, the report files written."""

from __future__ import annotations

import json

from helpers import save_model_dir, tiny_llama

from bench.quality_ablation import AblationConfig, run_ablation


def test_every_variant_on_the_same_users_beside_sasrec_and_mostpop(tmp_path, tokenizer, prepared):
    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    config = AblationConfig(profile="tiny", model=str(base), users=8, exact_users=4, device="cpu", sasrec_epochs=1,
                            work=str(tmp_path / "work"), output=str(tmp_path / "report"),
                            train_overrides={"select_users": 8})
    report = run_ablation(config, prepared)
    rows = report["variants"]
    assert {"baseline", "history-50", "ndcg-selection", "exact", "baseline@exact-users", "assisted", "best", "sasrec",
            "mostpop"} <= set(rows)
    assisted = json.loads((tmp_path / "work" / "eval" / "assisted.json").read_text())["protocol"]
    baseline = json.loads((tmp_path / "work" / "eval" / "baseline.json").read_text())["protocol"]
    # the same artifact scored with and without its assistant (a weight of 0 chosen on validation is the pure LLM)
    assert not baseline["assisted"] and assisted["assisted"] == (rows["assisted"]["assist_weight"] > 0)
    assert (tmp_path / "work" / "baseline" / "assistant" / "model.safetensors").is_file()
    assert rows["assistant alone"]["users"] == 8 and 0 <= rows["assistant alone"]["metrics"]["ndcg@10"] <= 1
    assert rows["history-50"]["lever"] == {"max_history": 50}
    assert json.loads((tmp_path / "work" / "history-50" / "prunerec.json").read_text())["max_history"] == 50
    assert "best_valid_ndcg@10" in json.loads((tmp_path / "work" / "ndcg-selection" / "prunerec.json").read_text())["training"]
    assert rows["exact"]["search"] == "exact" and rows["exact"]["users"] == 4 == rows["baseline@exact-users"]["users"]
    assert all(rows[n]["users"] == 8 for n in ("baseline", "history-50", "sasrec", "mostpop"))
    base = rows["baseline"]["metrics"]["ndcg@10"]
    levers = ("history-50", "ndcg-selection", "item-tokens", "sasrec-tokens")
    helped = {n for n in levers if rows[n]["metrics"]["ndcg@10"] > base}
    combined = {n for n in rows["best"]["combines"] if n not in ("exact", "assisted")}
    # every lever that helped, except the weaker kind of item tokens when both did (one field, two values)
    assert combined <= helped and helped - combined <= {"item-tokens", "sasrec-tokens"}
    assert len(combined & {"item-tokens", "sasrec-tokens"}) <= 1
    assert "exact" not in rows["best"]["combines"] and rows["best"]["users"] == 8  # exact was on other users
    assert json.loads((tmp_path / "work" / "item-tokens" / "prunerec.json").read_text())["item_tokens"]["kind"] == "learned"
    assert rows["sasrec-tokens"]["lever"] == {"item_tokens": "sasrec"}
    assert ("assisted" in rows["best"]["combines"]) == (rows["assisted"]["metrics"]["ndcg@10"] > base)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == ["ndcg.png", "report.json", "report.md"]
    assert "| history-50 | max_history=50 |" in (tmp_path / "report" / "report.md").read_text()


def test_a_subset_of_variants_runs_alone(tmp_path, tokenizer, prepared):
    base = save_model_dir(tmp_path / "base", tiny_llama(len(tokenizer)), tokenizer)
    config = AblationConfig(profile="tiny", model=str(base), users=6, device="cpu", sasrec_epochs=1,
                            work=str(tmp_path / "work"), output=str(tmp_path / "report"), variants=["baseline", "assisted"])
    rows = run_ablation(config, prepared)["variants"]
    assert set(rows) == {"baseline", "assisted", "assistant alone", "sasrec", "mostpop"}
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if (p / "prunerec.json").is_file()) == ["baseline"]
