"""The text-free assistant of D3's assisted decoding: a SASRec (Kang & McAuley, ICDM 2018) over catalog items.

"Decoding Matters" (Bao et al., 2024, §3.2) mixes, at every step of the constrained search, the LLM's
log-probability of the next title token with the log of the probability mass a text-free recommender puts on
the items under the new title prefix. This module is that recommender; the mixing is in
:mod:`llmrec.decode` (:meth:`llmrec.decode.TitleTrie.node_log_mass`) and :mod:`llmrec.exact`.

The architecture is SASRec's as RecBole configures it for the project's baseline (:mod:`bench.sasrec`): item
and absolute position embeddings (positions from the oldest item of the window), layer norm, dropout, causal
self-attention blocks (here torch's ``TransformerEncoderLayer``, pre-norm, GELU), scores = the last hidden
state dotted with the item embeddings, trained with cross-entropy over the whole catalog. It is prunerec's
own so that an artifact carries it as safetensors and serving needs no RecBole.

Format inside an artifact (DESIGN.md §5): ``assistant/config.json`` (:class:`AssistantConfig`, with the
catalog fingerprint it was trained on) and ``assistant/model.safetensors``; the manifest's ``assistant``
entry holds the mixing weight chosen on validation.

Sequences are right-padded with 0 and item ``i`` of the catalog is token ``i + 1``: with right padding the
causal mask alone keeps every real position off the padding (padding only ever lies in a position's future).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ASSISTANT_DIR = "assistant"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class AssistantConfig:
    """Shape of the assistant; defaults are the project's SASRec baseline (DESIGN.md §3)."""

    num_items: int
    """Catalog size."""
    max_length: int = 50
    """Most recent items the model sees."""
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    catalog_fingerprint: str = ""
    """Fingerprint of the catalog the item rows belong to (checked when an artifact loads it)."""


class SASRec(nn.Module):
    """Next-item scores over the catalog from a history of catalog indices."""

    def __init__(self, config: AssistantConfig) -> None:
        super().__init__()
        if config.num_items < 1:
            raise ValueError("the assistant needs a non-empty catalog")
        self.config = config
        hidden = config.hidden_size
        self.items = nn.Embedding(config.num_items + 1, hidden, padding_idx=0)
        self.positions = nn.Embedding(config.max_length, hidden)
        self.input_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        block = nn.TransformerEncoderLayer(hidden, config.heads, 4 * hidden, config.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, config.layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False)
        nn.init.normal_(self.items.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()

    @property
    def device(self) -> torch.device:
        return self.items.weight.device

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) right-padded item tokens (catalog index + 1, 0 = padding) -> (B, L, H)."""
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        states = self.dropout(self.input_norm(self.items(tokens) + self.positions(positions)[None]))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=states.dtype)
        return self.encoder(states, mask=causal, is_causal=True)

    def item_logits(self, states: torch.Tensor) -> torch.Tensor:
        """states (..., H) -> (..., num_items) scores of every catalog item (padding row left out)."""
        return states @ self.items.weight[1:].T

    def batch(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``max_length`` items of each history as right-padded tokens (B, L) and lengths (B,)."""
        windows = [list(h)[-self.config.max_length :] for h in histories]
        length = max(1, max((len(w) for w in windows), default=1))
        tokens = torch.zeros((len(windows), length), dtype=torch.long)
        for row, window in enumerate(windows):
            if window:
                tokens[row, : len(window)] = torch.as_tensor(window, dtype=torch.long) + 1
        lengths = torch.tensor([len(w) for w in windows], dtype=torch.long)
        return tokens.to(self.device), lengths.to(self.device)

    @torch.no_grad()
    def log_probs(self, histories: Sequence[Sequence[int]], excluded: Sequence[Sequence[int]] | None = None
                  ) -> torch.Tensor:
        """(B, num_items) float32 log P(next item | history), renormalised over the items not excluded.

        An empty history gets the uniform distribution (no evidence, so no influence on a mixed ranking)."""
        was_training = self.training
        self.eval()
        try:
            tokens, lengths = self.batch(histories)
            states = self.hidden_states(tokens)  # (B, L, H)
            last = states[torch.arange(len(histories), device=self.device), (lengths - 1).clamp(min=0)]
            logits = self.item_logits(last).float()  # (B, I)
            logits = torch.where((lengths > 0)[:, None], logits, torch.zeros_like(logits))
            if excluded is not None:
                for row, items in enumerate(excluded):
                    drop = [int(i) for i in items if 0 <= int(i) < logits.shape[1]]
                    if drop:
                        logits[row, torch.as_tensor(drop, device=logits.device)] = -math.inf
            return torch.log_softmax(logits, dim=-1)
        finally:
            self.train(was_training)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> SASRec:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{directory} holds no assistant ({CONFIG_FILE} and {WEIGHTS_FILE})")
        saved = json.loads((directory / CONFIG_FILE).read_text())
        known = {f.name for f in fields(AssistantConfig)}
        if "num_items" not in saved or set(saved) - known:  # e.g. an LLM's config.json
            raise FileNotFoundError(f"{directory} holds no assistant ({CONFIG_FILE} is not an assistant's)")
        model = cls(AssistantConfig(**saved))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        model.eval()
        return model.to(device) if device is not None else model
