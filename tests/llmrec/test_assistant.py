"""D3's assisted decoding: the prior mass under each trie node, the assisted scores (exact and beam), the
assistant's own contract (normalised, exclusions, padding, save/load) and its place in an artifact."""

from __future__ import annotations

import pytest
import torch
from helpers import histories, teacher_forced_score

from llmrec.assistant import ASSISTANT_DIR, AssistantConfig, SASRec


def make_assistant(prepared, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(AssistantConfig(num_items=len(prepared.catalog), max_length=8, hidden_size=16, layers=1, heads=2,
                                   catalog_fingerprint=prepared.catalog.fingerprint()))
    with torch.no_grad():  # spread the scores, so that the prior reorders the LLM's list
        model.items.weight.mul_(50)
    return model.eval()


def test_node_log_mass_sums_each_subtree(recommender, prepared):
    trie = recommender.trie
    log_probs = torch.log_softmax(torch.randn(2, len(prepared.catalog)), -1)
    log_probs[1, 3] = -torch.inf  # an excluded item
    mass = trie.node_log_mass(log_probs)
    assert mass[:, 0] == pytest.approx(torch.logsumexp(log_probs, -1), abs=1e-5)
    for node in range(1, trie.num_nodes):
        below = [i for i in range(len(prepared.catalog)) if node in trie.item_paths[i].tolist()]
        expected = torch.logsumexp(log_probs[:, below], -1)
        assert mass[:, node] == pytest.approx(expected, abs=1e-4)
    # an item's end node holds exactly that item
    ends = trie.item_paths.gather(1, (trie.item_paths > 0).sum(1, keepdim=True) - 1).squeeze(1)
    assert mass[0, ends] == pytest.approx(log_probs[0], abs=1e-4)
    assert mass[1, ends[3]] == -torch.inf


def test_assistant_is_normalised_respects_exclusions_and_padding(prepared):
    assistant = make_assistant(prepared)
    hs = histories(prepared, 4)
    log_probs = assistant.log_probs(hs, excluded=hs)
    assert torch.logsumexp(log_probs, -1) == pytest.approx(torch.zeros(4), abs=1e-5)
    for row, history in enumerate(hs):
        assert torch.isinf(log_probs[row, history]).all()
    # right padding: a history scored in a batch equals it scored alone
    alone = torch.cat([assistant.log_probs([h], excluded=[h]) for h in hs])
    assert torch.allclose(torch.where(torch.isinf(alone), 0.0, alone), torch.where(torch.isinf(log_probs), 0.0, log_probs),
                          atol=1e-5)
    # only the last max_length items count; an empty history is uniform
    long = list(range(len(prepared.catalog))) * 2
    assert torch.allclose(assistant.log_probs([long]), assistant.log_probs([long[-8:]]), atol=1e-5)
    uniform = assistant.log_probs([[]])
    assert torch.allclose(uniform, torch.full_like(uniform, -torch.log(torch.tensor(float(len(prepared.catalog))))))


def test_save_and_load_give_the_same_scores(prepared, tmp_path):
    assistant = make_assistant(prepared)
    loaded = SASRec.load(assistant.save(tmp_path / ASSISTANT_DIR))
    hs = histories(prepared, 3)
    assert torch.equal(assistant.log_probs(hs), loaded.log_probs(hs))
    assert loaded.config == assistant.config
    with pytest.raises(FileNotFoundError, match="no assistant"):
        SASRec.load(tmp_path / "missing")


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_assisted_exact_scores_add_the_weighted_prior(recommender, prepared, weight):
    assistant = make_assistant(prepared)
    recommender.attach_assistant(assistant, weight)
    history = histories(prepared, 1)[0]
    n = len(prepared.catalog)
    prior = assistant.log_probs([history])[0]
    ranked = recommender.recommend([history], k=n, head="full", search="exact")[0]
    for item, score in ranked:
        expected = teacher_forced_score(recommender, history, item) + weight * float(prior[item])
        assert score == pytest.approx(expected, abs=1e-3)
    pure = recommender.recommend([history], k=n, head="full", search="exact", assist=False)[0]
    assert [i for i, _ in pure] != [i for i, _ in ranked]  # the prior changes the order


def test_assisted_beam_search_with_as_many_beams_as_items_is_exact(recommender, prepared):
    recommender.attach_assistant(make_assistant(prepared), 1.0)
    n = len(prepared.catalog)
    hs = histories(prepared, 3)
    exact = recommender.recommend(hs, k=8, head="catalog", search="exact", exclude=hs)
    beam = recommender.recommend(hs, k=8, num_beams=n, head="catalog", exclude=hs, batch_size=3)
    for a, b, history in zip(exact, beam, hs, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)
        assert not set(history) & {i for i, _ in b}


def test_a_dominant_prior_gives_the_assistants_ranking_and_weight_zero_the_llms(recommender, prepared):
    assistant = make_assistant(prepared)
    hs = histories(prepared, 2)
    n = len(prepared.catalog)
    pure = recommender.recommend(hs, k=5, num_beams=n, exclude=hs)
    recommender.attach_assistant(assistant, 0.0)
    assert recommender.recommend(hs, k=5, num_beams=n, exclude=hs) == pure
    recommender.attach_assistant(assistant, 1000.0)
    dominated = recommender.recommend(hs, k=5, num_beams=n, exclude=hs)
    prior = assistant.log_probs(hs, excluded=hs)
    for row, ranked in enumerate(dominated):
        assert [i for i, _ in ranked] == prior[row].topk(5).indices.tolist()


def test_assist_switch_and_catalog_checks(recommender, prepared):
    hs = histories(prepared, 1)
    with pytest.raises(ValueError, match="carries no assistant"):
        recommender.recommend(hs, k=3, assist=True)
    wrong = SASRec(AssistantConfig(num_items=len(prepared.catalog) + 1))
    with pytest.raises(ValueError, match="scores 21 items"):
        recommender.attach_assistant(wrong, 1.0)
    other = SASRec(AssistantConfig(num_items=len(prepared.catalog), catalog_fingerprint="another"))
    with pytest.raises(ValueError, match="another catalog"):
        recommender.attach_assistant(other, 1.0)
    assert recommender.assistant is None
