"""A loaded recommender: model + tokenizer + catalog + prompt template, answering top-k queries.

This is what evaluation, the ``recommend`` command and the HTTP service call. Histories are catalog
indices (oldest first); the prompt uses the last ``max_history`` of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmrec import item_tokens
from llmrec.artifact import CATALOG, read_manifest
from llmrec.assistant import ASSISTANT_DIR, SASRec
from llmrec.decode import BeamSearchConfig, NextTokenScorer, TitleTrie, constrained_beam_search, lean_decoder_for
from llmrec.exact import TrieLevels, exact_rank
from llmrec.fast_step import LeanDecoder
from llmrec.model import load_model
from llmrec.prompting import PromptEncoder
from recdata.catalog import Catalog
from recdata.prompts import PromptTemplate

logger = logging.getLogger(__name__)


class Recommender:
    """Top-k next-item recommendation by constrained beam search."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        catalog: Catalog,
        template: PromptTemplate,
        max_history: int = 10,
        manifest: dict | None = None,
        max_prompt_tokens: int | None = None,
        assistant: SASRec | None = None,
        assist_weight: float = 0.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.template = template
        self.max_history = max_history
        self.manifest = manifest or {}
        self.encoder = PromptEncoder(tokenizer, template, max_history, max_prompt_tokens,
                                     item_tokens.token_map(model, catalog.titles))
        self.trie = TitleTrie.build([self.encoder.response_ids(t) for t in catalog.titles], self.encoder.end_id)
        self.device = next(model.parameters()).device
        self.trie = self.trie.to(self.device)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.encoder.end_id)
        self._scorers: dict[str, NextTokenScorer] = {}
        self._lean: dict[str, LeanDecoder | None] = {}
        self._levels: TrieLevels | None = None
        self.assistant: SASRec | None = None
        self.assist_weight = 0.0
        if assistant is not None:
            self.attach_assistant(assistant, assist_weight)

    def attach_assistant(self, assistant: SASRec | None, weight: float) -> None:
        """Use ``assistant`` (a text-free SASRec over this catalog) in the search with mixing weight ``weight``
        (D3's assisted decoding; see :mod:`llmrec.assistant`); None detaches it."""
        if assistant is None:
            self.assistant, self.assist_weight = None, 0.0
            return
        if assistant.config.num_items != len(self.catalog):
            raise ValueError(f"the assistant scores {assistant.config.num_items} items, the catalog has {len(self.catalog)}")
        fingerprint = assistant.config.catalog_fingerprint
        if fingerprint and fingerprint != self.catalog.fingerprint():
            raise ValueError("the assistant was trained on another catalog (fingerprints differ)")
        if weight < 0:
            raise ValueError(f"the assistant's weight must be >= 0, got {weight}")
        self.assistant, self.assist_weight = assistant.to(self.device).eval(), float(weight)

    def uses_assistant(self, assist: bool | None) -> bool:
        """Whether a query with ``assist`` (None: the artifact's default, i.e. on when it carries one) mixes the
        assistant in; asking for it without one is an error."""
        if assist and self.assistant is None:
            raise ValueError("this artifact carries no assistant (train one with `prunerec assist`)")
        return self.assistant is not None and self.assist_weight > 0 and assist is not False

    def scorer(self, head: str) -> NextTokenScorer:
        """The next-token scorer of a head mode, its LM-head rows gathered once per catalog."""
        if head not in self._scorers:
            distilled_over = (self.manifest.get("distillation") or {}).get("loss_vocabulary")
            if head not in ("catalog", "trie") and isinstance(distilled_over, int):
                logger.warning("this artifact's last distillation trained only the %d catalog tokens' logits "
                               "(--distill-vocab catalog): head %r normalises over tokens it never trained, so "
                               "its scores are worse than the catalog head's", distilled_over, head)
            self._scorers[head] = NextTokenScorer(self.model, self.trie, head)
        return self._scorers[head]

    def lean_decoder(self, step: str) -> LeanDecoder | None:
        """The packed decoding step for ``step`` ('auto', 'lean', 'compiled', 'graphs'; None for 'stock' or a model it cannot run),
        built once."""
        if step not in self._lean:
            self._lean[step] = lean_decoder_for(self.model, step)
        return self._lean[step]

    def refresh(self) -> None:
        """Forget the scorers' cached LM-head rows and the lean step's packed weights: call it after the model's
        weights changed (training)."""
        self._scorers.clear()
        self._lean.clear()

    @classmethod
    def from_artifact(cls, directory: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> Recommender:
        manifest = read_manifest(directory)
        loaded = load_model(directory, device=device, dtype=dtype)
        catalog = Catalog.load(Path(directory) / CATALOG)
        if manifest.get("vocab"):  # a pruned vocabulary serves only the titles it was cut for
            from llmrec.vocabulary import VocabularyCoverageError, check_artifact_catalog

            problems = check_artifact_catalog(directory, catalog.titles)
            if problems:
                raise VocabularyCoverageError(problems)
        template = PromptTemplate.from_dict(manifest["template"])
        assistant, weight = None, 0.0
        if manifest.get("assistant"):
            assistant = SASRec.load(Path(directory) / ASSISTANT_DIR)
            weight = float(manifest["assistant"]["weight"])
        return cls(loaded.model, loaded.tokenizer, catalog, template, int(manifest["max_history"]), manifest,
                   manifest.get("max_prompt_tokens"), assistant, weight)

    def prompt_ids(self, history: Sequence[int]) -> list[int]:
        return self.encoder.prompt_ids([self.catalog.titles[i] for i in history])

    def recommend(
        self,
        histories: Sequence[Sequence[int]],
        k: int = 10,
        num_beams: int | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
        batch_size: int = 8,
        progress: bool = False,
        head: str = "catalog",
        search: str = "beam",
        assist: bool | None = None,
        step: str = "auto",
        narrow: bool = True,
    ) -> list[list[tuple[int, float]]]:
        """For each history, the top-k (catalog index, score) pairs, best first.

        Args:
            histories: catalog indices per user, oldest first.
            k: items per user.
            num_beams: beams per user (default max(k, 20)).
            exclude: catalog indices per user that must not be recommended (e.g. the history).
            batch_size: users decoded together.
            progress: show a progress bar.
            head: 'full' (exact log-probabilities), 'catalog' (LM head over the catalog's tokens only,
                renormalised over them), 'catalog-fullnorm' or 'trie' (each step over the title prefix's
                continuations: log P(item) over the catalog; see :class:`llmrec.decode.BeamSearchConfig`).
            search: 'beam' (constrained beam search with ``num_beams``) or 'exact' (every catalog title scored
                exactly, :mod:`llmrec.exact`; one user at a time).
            assist: mix the assistant's item probabilities into the scores (D3); None: when the artifact
                carries an assistant. Scores are then log P_LLM(item) + w × log P_assistant(item).
            step: how beam search runs a decoding step: 'auto' ('graphs' on CUDA, else 'lean'), 'lean'
                (:mod:`llmrec.fast_step`), 'compiled' (the lean
                step through torch.compile), 'graphs' (the lean step replayed as a CUDA graph) or 'stock' (the model's own forward); the same lists and scores to
                float tolerance.
            narrow: with the eager lean step, compute only live beams and score titles with one way left in one
                pass (:attr:`llmrec.decode.BeamSearchConfig.narrow`); False for comparisons.
        """
        if search not in ("beam", "exact"):
            raise ValueError(f"search must be 'beam' or 'exact', not {search!r}")
        if k < 1 or k > len(self.catalog):
            raise ValueError(f"k must be between 1 and the catalog size {len(self.catalog)}, got {k}")
        config = BeamSearchConfig(num_beams=max(num_beams or 20, k), top_k=k, head=head, step=step, narrow=narrow)
        lean = self.lean_decoder(step) if search == "beam" else None
        assisted = self.uses_assistant(assist)
        scorer = self.scorer(head)
        results: list[list[tuple[int, float]]] = []
        batches = range(0, len(histories), batch_size)
        for start in tqdm(batches, desc="recommend", unit="batch", disable=not progress):
            chunk = histories[start : start + batch_size]
            prompts = [self.prompt_ids(h) for h in chunk]
            excluded = exclude[start : start + batch_size] if exclude is not None else None
            prior = self.assistant.log_probs(chunk, excluded) if assisted and self.assistant is not None else None
            weight = self.assist_weight if prior is not None else 0.0
            if search == "exact":
                if self._levels is None:
                    self._levels = TrieLevels.of(self.trie)
                results.extend(exact_rank(self.model, prompts, self.trie, k, excluded, scorer, head, self._levels,
                                          prior=prior, prior_weight=weight))
                continue
            results.extend(constrained_beam_search(self.model, prompts, self.trie, config, self.pad_id, excluded=excluded,
                                                   scorer=scorer, prior=prior, prior_weight=weight, lean=lean))
        return results
