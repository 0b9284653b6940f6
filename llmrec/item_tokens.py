"""Collaborative item tokens: one learned vector per catalog item, placed in the prompt after each history title.

The levers of collaborative item identity in LLM recommenders: P5 with collaborative item ids (Hua et al.,
"How to Index Item IDs for Recommendation Foundation Models", SIGIR-AP 2023, §4), E4SRec's and LLaRA's item
embeddings as soft tokens (Liao et al., "LLaRA", SIGIR 2024, §3.2: the "hybrid" prompt puts the item's
collaborative embedding, projected into the LLM's space, after its title). Two kinds:

- ``learned``: a free table (num_items, d), row i initialised from the mean of item i's title token embeddings
  and trained with the LLM;
- ``sasrec``: a trained SASRec's item embeddings (frozen, (num_items, h)) through a learned linear projection
  h -> d (LLaRA's hybrid; the SASRec is :class:`llmrec.assistant.SASRec`).

Mechanics: item i is the token id ``V + i`` (V = the LLM's vocabulary), which the tokenizer never produces.
:class:`ItemTokenEmbedding` replaces the model's input embedding module and looks those ids up in the item
table, every other id in the model's own embedding; the LM head keeps its V rows, so item tokens are input
only and never compete with title tokens. Everything that runs the model on token ids (training, packing,
the beam and exact searches, distillation, the pruning stages) needs nothing else; the prompt encoder puts
the id after each history title (:class:`llmrec.prompting.PromptEncoder`, ``item_tokens``), and a title
without a row (a catalog addition) gets its title alone.

Format: the model's files stay what stock ``from_pretrained`` loads (the wrapper is taken off while saving);
the table lies beside them in ``item_tokens.safetensors`` (``learned``: ``table`` (num_items, d);
``sasrec``: ``sasrec_items`` (num_items, h), ``projection.weight`` (d, h), ``projection.bias`` (d,)), and the
manifest's ``item_tokens`` entry names the kind and the number of items. :func:`llmrec.model.load_model` puts
it back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

ITEM_TOKENS_FILE = "item_tokens.safetensors"
KINDS = ("learned", "sasrec")


class ItemTokenEmbedding(nn.Module):
    """The model's input embedding plus item vectors for the ids V .. V + num_items − 1."""

    base: nn.Embedding
    table: nn.Parameter
    sasrec_items: torch.Tensor
    projection: nn.Linear

    def __init__(self, base: nn.Embedding, kind: str, table: torch.Tensor | None = None,
                 sasrec_items: torch.Tensor | None = None, projection: nn.Linear | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown item token kind {kind!r}; choose one of {KINDS}")
        self.base = base
        self.kind = kind
        if kind == "learned":
            if table is None:
                raise ValueError("learned item tokens need a table")
            self.table = nn.Parameter(table)
        else:
            if sasrec_items is None or projection is None:
                raise ValueError("sasrec item tokens need the SASRec item embeddings and a projection")
            self.register_buffer("sasrec_items", sasrec_items)  # frozen: the collaborative signal as trained
            self.projection = projection

    @property
    def weight(self) -> torch.Tensor:
        """The token embedding (V, d): what ``get_input_embeddings().weight`` means to transformers (tying)."""
        return self.base.weight

    @property
    def vocab_size(self) -> int:
        return int(self.base.num_embeddings)

    @property
    def num_items(self) -> int:
        return int((self.table if self.kind == "learned" else self.sasrec_items).shape[0])

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """(N,) catalog indices -> (N, d)."""
        if self.kind == "learned":
            return self.table[items]
        return self.projection(self.sasrec_items[items].to(self.projection.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.vocab_size
        is_item = ids >= vocab
        out = self.base(ids.masked_fill(is_item, 0))
        if bool(is_item.any()):
            vectors = self.item_vectors(ids[is_item] - vocab).to(out.dtype)
            out = out.masked_scatter(is_item[..., None], vectors)
        return out

    def token_id(self, item: int) -> int:
        return self.vocab_size + int(item)

    def state(self) -> dict[str, torch.Tensor]:
        if self.kind == "learned":
            return {"table": self.table.detach().cpu().contiguous()}
        return {"sasrec_items": self.sasrec_items.detach().cpu().contiguous(),
                "projection.weight": self.projection.weight.detach().cpu().contiguous(),
                "projection.bias": self.projection.bias.detach().cpu().contiguous()}

    def sliced(self, keep: torch.Tensor) -> ItemTokenEmbedding:
        """The item vectors restricted to residual channels ``keep`` (PruneRec's width stage), around the same
        base (the caller puts in the sliced model's own)."""
        if self.kind == "learned":
            return ItemTokenEmbedding(self.base, "learned", self.table.detach()[:, keep].clone())
        projection = nn.Linear(self.projection.in_features, int(keep.numel()), device=self.projection.weight.device,
                               dtype=self.projection.weight.dtype)
        with torch.no_grad():
            projection.weight.copy_(self.projection.weight[keep])
            projection.bias.copy_(self.projection.bias[keep])
        return ItemTokenEmbedding(self.base, "sasrec", sasrec_items=self.sasrec_items.clone(), projection=projection)


def _embedding(model: nn.Module) -> nn.Embedding:
    """The model's own token embedding (under item tokens, when it has them)."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    return cast(nn.Embedding, embedding.base if isinstance(embedding, ItemTokenEmbedding) else embedding)


def item_tokens_of(model: nn.Module) -> ItemTokenEmbedding | None:
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    return embedding if isinstance(embedding, ItemTokenEmbedding) else None


def attach(model: PreTrainedModel, item_tokens: ItemTokenEmbedding) -> PreTrainedModel:
    """Put ``item_tokens`` (re-based on this model's own embedding) in as the input embedding."""
    base = _embedding(model)
    item_tokens.base = base
    item_tokens.to(base.weight.device)
    model.set_input_embeddings(item_tokens)
    return model


def detach(model: PreTrainedModel) -> ItemTokenEmbedding | None:
    """Take the item tokens off (the model's own embedding goes back in); returns them (None: there were none)."""
    item_tokens = item_tokens_of(model)
    if item_tokens is not None:
        model.set_input_embeddings(item_tokens.base)
    return item_tokens


@contextlib.contextmanager
def detached(model: PreTrainedModel) -> Iterator[ItemTokenEmbedding | None]:
    """The model without its item tokens inside the block (saving, surgery), with them again after."""
    item_tokens = detach(model)
    try:
        yield item_tokens
    finally:
        if item_tokens is not None:
            attach(model, item_tokens)


def initial_table(model: PreTrainedModel, title_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(num_items, d): each row the mean of its title's token embeddings (a start that already means the item)."""
    weight = _embedding(model).weight.detach()
    rows = [weight[torch.as_tensor(list(ids), device=weight.device)].float().mean(0) if ids else
            torch.zeros(weight.shape[1], device=weight.device) for ids in title_ids]
    return torch.stack(rows).to(weight.dtype)


def learned(model: PreTrainedModel, title_ids: Sequence[Sequence[int]]) -> ItemTokenEmbedding:
    return ItemTokenEmbedding(_embedding(model), "learned", initial_table(model, title_ids))


def from_sasrec(model: PreTrainedModel, sasrec_items: torch.Tensor, seed: int = 0) -> ItemTokenEmbedding:
    """LLaRA's hybrid: frozen SASRec item embeddings (num_items, h) through a new projection h -> d, scaled so
    that the projected vectors start at the size of the model's token embeddings."""
    weight = _embedding(model).weight
    generator = torch.Generator().manual_seed(seed)
    hidden = sasrec_items.shape[1]
    projection = nn.Linear(hidden, weight.shape[1])
    with torch.no_grad():
        projection.weight.copy_(torch.randn(weight.shape[1], hidden, generator=generator) / hidden**0.5)
        projection.bias.zero_()
        target = weight.detach().float().norm(dim=1).mean()
        current = projection(sasrec_items.float()).norm(dim=1).mean().clamp(min=1e-6)
        projection.weight.mul_(target / current)
    projection.to(device=weight.device, dtype=weight.dtype)
    return ItemTokenEmbedding(_embedding(model), "sasrec", sasrec_items=sasrec_items.to(weight.device),
                              projection=projection)


def save(item_tokens: ItemTokenEmbedding, directory: str | Path) -> dict[str, object]:
    """Write ``item_tokens.safetensors`` into ``directory``; returns the manifest entry."""
    save_file(item_tokens.state(), str(Path(directory) / ITEM_TOKENS_FILE))
    return {"kind": item_tokens.kind, "items": item_tokens.num_items, "file": ITEM_TOKENS_FILE}


def load(model: PreTrainedModel, directory: str | Path) -> PreTrainedModel:
    """Attach the item tokens an artifact holds (a no-op without the file)."""
    path = Path(directory) / ITEM_TOKENS_FILE
    if not path.is_file():
        return model
    state = load_file(str(path))
    base = _embedding(model)
    device, dtype = base.weight.device, base.weight.dtype
    if "table" in state:
        item_tokens = ItemTokenEmbedding(base, "learned", state["table"].to(device, dtype))
    else:
        weight = state["projection.weight"]
        projection = nn.Linear(weight.shape[1], weight.shape[0], device=device, dtype=dtype)
        with torch.no_grad():
            projection.weight.copy_(weight)
            projection.bias.copy_(state["projection.bias"])
        item_tokens = ItemTokenEmbedding(base, "sasrec", sasrec_items=state["sasrec_items"].to(device), projection=projection)
    if item_tokens.item_vectors(torch.zeros(1, dtype=torch.long, device=device)).shape[-1] != base.weight.shape[1]:
        raise ValueError(f"{path}: the item vectors' width does not match the model's hidden size")
    return attach(model, item_tokens)


def token_map(model: nn.Module, titles: Sequence[str]) -> dict[str, int] | None:
    """Title -> item token id for the model's item tokens (None: the model has none). Titles beyond the table
    (items added to the catalog after training) get no token."""
    item_tokens = item_tokens_of(model)
    if item_tokens is None:
        return None
    return {title: item_tokens.token_id(i) for i, title in enumerate(titles[: item_tokens.num_items])}
