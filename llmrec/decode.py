"""Constrained beam search over a token trie of catalog titles (BIGRec/D3 grounding by decoding).

Every answer is a real catalog item: at each step a beam may only extend its title prefix by a token
that some catalog title continues with, and a beam that emits the end token completes exactly one item.
DESIGN.md §3 and §7 set the requirements this implementation meets:

- users are decoded together in one batch (left-padded prompts, explicit position ids), with the KV cache;
- the prompt is run once per user and its cache is expanded to the beams afterwards;
- the trie is a CSR of tensors (``child_offsets``, ``child_tokens``, ``child_nodes``); the allowed
  continuations of all beams are gathered at once with ``repeat_interleave`` arithmetic, never by a Python
  loop per beam;
- the item behind a finished beam is read from the trie's terminal node, never by decoding strings;
- with the eager lean step the search is narrowed (:attr:`BeamSearchConfig.narrow`): a step computes only the
  users still searching × the most live beams any of them has, and once every live beam is on a title with one
  way left to go, the rest of those titles is scored in one pass instead of one step per token.

Scores are the sum of token log-probabilities of the response, end token included, i.e. log P(item | prompt)
under the model (no length normalisation, so scores fall monotonically along a path and the search stops
exactly when no live beam can beat the k-th finished item). The search keeps ``num_beams`` live prefixes
per user; every completed item is recorded, and the best ``top_k`` distinct items are returned sorted by
score. Items a caller excludes (e.g. the user's history) are dropped when they complete. Under the 'trie' head
(:attr:`BeamSearchConfig.head`) each token's probability is normalised over the continuations of its title
prefix instead, so a score is log P(item) over the catalog's items and a title with one way left is complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from llmrec.fast_step import BeamCache, LeanDecoder, lean_supported
from llmrec.prefix_cache import prefix_beam_attention_enabled, prefix_beam_cache

logger = logging.getLogger(__name__)

NEG_INF = float("-inf")


@dataclass
class TitleTrie:
    """A token trie of every catalog title, stored as tensors. Node 0 is the root."""

    child_offsets: torch.Tensor
    """(num_nodes + 1,) int64: the edges of node n are child_offsets[n] : child_offsets[n + 1]."""
    child_tokens: torch.Tensor
    """(num_edges,) int64: the token on each edge, sorted within a node."""
    child_nodes: torch.Tensor
    """(num_edges,) int64: the node each edge leads to."""
    node_item: torch.Tensor
    """(num_nodes,) int64: catalog index of the item completed at a node, -1 elsewhere."""
    end_id: int
    max_depth: int
    vocabulary: torch.Tensor
    """(U,) int64: the sorted distinct tokens the catalog's responses use (the end token included)."""
    child_local: torch.Tensor
    """(num_edges,) int64: each edge's token as an index into ``vocabulary``."""
    item_paths: torch.Tensor
    """(num_items, max_depth) int64: the nodes on each item's path below the root, padded with 0 (the root)."""
    subtree_items: torch.Tensor
    """(num_nodes,) int64: how many items complete at or below each node."""
    item_tokens: torch.Tensor
    """(num_items, max_depth) int64: each item's response ids (title tokens and the end token), padded with the end
    token."""
    item_length: torch.Tensor
    """(num_items,) int64: the length of each item's response ids."""
    node_single_item: torch.Tensor
    """(num_nodes,) int64: the one item at or below a node whose subtree holds a single item (a title with one
    way left to go), -1 elsewhere."""

    def available(self, excluded: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, num_nodes) items still reachable below each node once each row's excluded items are removed.

        A beam whose node has none left can only end in excluded items, so it is never extended; this keeps
        all beams on items that can be returned (else a model that favours the history could fill its
        beams with excluded titles and return fewer than k items).
        """
        rows = [torch.as_tensor(sorted(set(int(i) for i in items if 0 <= int(i) < self.item_paths.shape[0])), dtype=torch.long)
                for items in excluded]
        out = self.subtree_items.repeat(len(rows), 1)
        for row, items in enumerate(rows):
            if items.numel():
                path_nodes = self.item_paths.index_select(0, items.to(self.item_paths.device)).reshape(-1)
                out[row].index_add_(0, path_nodes, torch.full_like(path_nodes, -1))
        return out

    def node_log_mass(self, item_log_probs: torch.Tensor) -> torch.Tensor:
        """(B, num_items) log-probabilities of items -> (B, num_nodes) log of the mass under each node.

        The root holds the whole mass; a node's mass is the sum over the items whose title passes through it
        (D3's text-free prefix probability). Summed in float64 after a per-row max shift, so that items far
        below the best do not underflow to an empty subtree; a node with only -inf items gets -inf.
        """
        log_probs = item_log_probs.to(torch.float64)
        shift = log_probs.max(dim=1, keepdim=True).values
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        probs = torch.exp(log_probs - shift)  # (B, I)
        mass = torch.zeros((probs.shape[0], self.num_nodes), dtype=torch.float64, device=probs.device)
        mass[:, 0] = probs.sum(dim=1)
        paths = self.item_paths.to(probs.device)
        for depth in range(paths.shape[1]):
            nodes = paths[:, depth]
            on_path = nodes > 0  # 0 pads paths shorter than the deepest title
            mass.index_add_(1, nodes[on_path], probs[:, on_path])
        return (torch.log(mass) + shift).to(torch.float32)

    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], end_id: int) -> TitleTrie:
        """Build from each item's response ids (title tokens *and* the end token), in catalog order."""
        children: list[dict[int, int]] = [{}]
        items = [-1]
        for index, tokens in enumerate(sequences):
            if not tokens or tokens[-1] != end_id:
                raise ValueError(f"item {index}: response ids must end with the end token {end_id}")
            if end_id in tokens[:-1]:
                raise ValueError(f"item {index}: the end token occurs inside the title")
            node = 0
            for token in tokens:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = len(children)
                    children[node][token] = nxt
                    children.append({})
                    items.append(-1)
                node = nxt
            if items[node] != -1:
                raise ValueError(f"items {items[node]} and {index} have identical token sequences")
            items[node] = index
        offsets, tokens_flat, nodes_flat = [0], [], []
        for edges in children:
            for token in sorted(edges):
                tokens_flat.append(token)
                nodes_flat.append(edges[token])
            offsets.append(len(tokens_flat))
        child_tokens = torch.tensor(tokens_flat, dtype=torch.long)
        vocabulary = torch.unique(child_tokens)  # sorted
        depth = max((len(s) for s in sequences), default=0)
        paths = torch.zeros((len(sequences), depth), dtype=torch.long)
        item_tokens = torch.full((len(sequences), depth), end_id, dtype=torch.long)
        subtree = torch.zeros(len(children), dtype=torch.long)
        for index, tokens in enumerate(sequences):
            node = 0
            item_tokens[index, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            for position, token in enumerate(tokens):
                node = children[node][token]
                paths[index, position] = node
                subtree[node] += 1
        single = torch.full((len(children),), -1, dtype=torch.long)
        for index in range(len(sequences)):
            on_path = paths[index][paths[index] > 0]
            lone = on_path[subtree[on_path] == 1]
            single[lone] = index
        return cls(
            child_offsets=torch.tensor(offsets, dtype=torch.long),
            child_tokens=child_tokens,
            child_nodes=torch.tensor(nodes_flat, dtype=torch.long),
            node_item=torch.tensor(items, dtype=torch.long),
            end_id=end_id,
            max_depth=max((len(s) for s in sequences), default=0),
            vocabulary=vocabulary,
            child_local=torch.searchsorted(vocabulary, child_tokens),
            item_paths=paths,
            subtree_items=subtree,
            item_tokens=item_tokens,
            item_length=torch.tensor([len(s) for s in sequences], dtype=torch.long),
            node_single_item=single,
        )

    @property
    def num_nodes(self) -> int:
        return int(self.node_item.numel())

    def to(self, device: torch.device) -> TitleTrie:
        return TitleTrie(
            self.child_offsets.to(device),
            self.child_tokens.to(device),
            self.child_nodes.to(device),
            self.node_item.to(device),
            self.end_id,
            self.max_depth,
            self.vocabulary.to(device),
            self.child_local.to(device),
            self.item_paths.to(device),
            self.subtree_items.to(device),
            self.item_tokens.to(device),
            self.item_length.to(device),
            self.node_single_item.to(device),
        )

    def expand(self, nodes: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All allowed continuations of a set of beams.

        Args:
            nodes: (N,) trie node of each beam.
            live: (N,) bool, False for beams that must not expand.
        Returns:
            (beam, token, child), each (C,): for every candidate, the beam it extends, the token it
            appends and the node it reaches; ordered by beam.
        """
        beam, edge = self.expand_edges(nodes, live)
        return beam, self.child_tokens[edge], self.child_nodes[edge]

    def expand_edges(self, nodes: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(beam, edge) of every allowed continuation, each (C,), ordered by beam."""
        starts = self.child_offsets[nodes]
        counts = torch.where(live, self.child_offsets[nodes + 1] - starts, torch.zeros_like(starts))
        beam = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)
        first_of_beam = torch.cumsum(counts, 0) - counts  # exclusive prefix sum
        edge = starts[beam] + torch.arange(beam.numel(), device=nodes.device) - first_of_beam[beam]
        return beam, edge


def grouped_topk(group: torch.Tensor, scores: torch.Tensor, num_groups: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores within each group of a flat, group-sorted candidate list.

    Args:
        group: (C,) non-decreasing group index of each candidate.
        scores: (C,) candidate scores.
    Returns:
        (scores, index), each (num_groups, k): the best scores per group (-inf where a group has fewer than
        k candidates) and their positions in the flat list (valid only where the score is finite).
    """
    device = scores.device
    if scores.numel() == 0:
        return torch.full((num_groups, k), NEG_INF, device=device), torch.zeros((num_groups, k), dtype=torch.long, device=device)
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(scores.numel(), device=device) - starts[group]
    width = max(int(counts.max()), k)
    table = torch.full((num_groups, width), NEG_INF, device=device, dtype=scores.dtype)
    table[group, position] = scores
    top_scores, top_position = table.topk(k, dim=1)
    index = (starts[:, None] + top_position).clamp(max=scores.numel() - 1)
    return top_scores, index


@dataclass
class BeamSearchConfig:
    """Settings of the constrained search."""

    num_beams: int = 20
    """Live title prefixes kept per user (>= top_k; evaluation uses at least 20)."""
    top_k: int = 10
    """Distinct items returned per user."""
    head: str = "catalog"
    """'full': log-softmax over the whole vocabulary (exact item probabilities). 'catalog': the LM head only
    over the tokens catalog titles use, normalised over them (cheaper; changes the scores). 'catalog-fullnorm':
    the catalog rows for the scores but normalised over the full vocabulary (same lists as 'full'; a check).
    'trie': each step normalised over the tokens that continue the beam's title prefix in the catalog (its trie
    node's children), so a score is log P(item) under the model's distribution restricted to the catalog's
    items (they sum to 1 over the catalog) and a title with one way left adds nothing: its beam is finished at
    once, without a model call for the rest of its title."""
    step: str = "auto"
    """How a decoding step runs: 'auto' ('graphs' on a CUDA device, 'lean' elsewhere: the fastest measured on
    each, README "Constrained top-k decoding"), 'lean' (:mod:`llmrec.fast_step`: packed weights, a preallocated beam cache,
    fewer and larger operations; falls back to 'stock' for a model it cannot run), 'compiled' (the lean step
    through torch.compile; the first calls compile), 'graphs' (the lean step recorded as a CUDA graph per
    shape and replayed: one launch per step on a GPU; the same buffers run eagerly elsewhere) or 'stock' (the
    model's own forward over :mod:`llmrec.prefix_cache`). Same lists and scores to float tolerance."""
    narrow: bool = True
    """With the eager lean step ('lean', 'auto' on a CPU): compute only the live beams' rows (a step runs the users
    still searching × the most live beams any of them has, not users × ``num_beams``), and once every live beam is on a title with
    one way left to go, score the rest of those titles in one pass (:meth:`llmrec.fast_step.LeanDecoder.extend`)
    instead of one step per token. Same lists and scores to float tolerance; False runs every row, one token a
    step (the comparison the benchmark makes)."""


HEADS = ("full", "catalog", "catalog-fullnorm", "trie")
STEPS = ("auto", "lean", "compiled", "graphs", "stock")


def lean_decoder_for(model: PreTrainedModel, step: str) -> LeanDecoder | None:
    """A :class:`LeanDecoder` (compiled for 'compiled', graph-recorded for 'graphs') when ``step`` asks for one and the model allows it, else
    None (the stock step)."""
    if step not in STEPS:
        raise ValueError(f"unknown decoding step {step!r}; choose one of {STEPS}")
    if step == "auto":
        step = "graphs" if next(model.parameters()).device.type == "cuda" else "lean"
    if step == "stock":
        return None
    reason = lean_supported(model)
    if reason is not None:
        logger.info("decoding with the stock step: %s", reason)
        return None
    if step == "graphs" and next(model.parameters()).device.type != "cuda":
        logger.info("the 'graphs' step records CUDA graphs on a CUDA device only: its workspaces run eagerly here")
    return LeanDecoder(model, compiled=step == "compiled", graphs=step == "graphs")


class NextTokenScorer:
    """Log-probabilities of the next token from the last hidden state, per the head mode.

    For 'catalog' modes the rows of the LM head (and bias) for the catalog's tokens are gathered once, here,
    not per step: (U, d) instead of (V, d).
    """

    def __init__(self, model: PreTrainedModel, trie: TitleTrie, head: str) -> None:
        if head not in HEADS:
            raise ValueError(f"unknown head mode {head!r}; choose one of {HEADS}")
        self.head = head
        self.output = model.get_output_embeddings()
        weight = self.output.weight
        self.sub_weight = weight.index_select(0, trie.vocabulary.to(weight.device)) if head != "full" else None
        bias = getattr(self.output, "bias", None)
        self.sub_bias = bias.index_select(0, trie.vocabulary.to(bias.device)) if bias is not None and head != "full" else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, d) -> (N, V) log-probs for 'full', (N, U) over the catalog vocabulary otherwise ('trie': the
        catalog tokens' logits, which the caller normalises over each trie node's children:
        :func:`log_softmax_by_group`)."""
        if self.head == "full":
            return torch.log_softmax(self.output(hidden).float(), dim=-1)
        assert self.sub_weight is not None
        logits = torch.nn.functional.linear(hidden, self.sub_weight, self.sub_bias).float()
        if self.head == "trie":
            return logits
        if self.head == "catalog":
            return torch.log_softmax(logits, dim=-1)
        return logits - torch.logsumexp(self.output(hidden).float(), dim=-1, keepdim=True)

    def selected_logits(self, hidden: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(C,) the logit of catalog-vocabulary column ``columns[c]`` at hidden state ``hidden[rows[c]]``.

        What the 'trie' head needs: only the logits of the tokens that continue the beams' prefixes, usually a few
        per row after the first token. Where they are few (C × 4 < rows × U) each is one dot product with its LM-head
        row, else the rows' logits over the whole catalog vocabulary are computed and gathered (the first step's
        candidates are most of the vocabulary)."""
        assert self.sub_weight is not None, "the full head has no catalog rows"
        if columns.numel() * 4 >= hidden.shape[0] * self.sub_weight.shape[0]:
            return torch.nn.functional.linear(hidden, self.sub_weight, self.sub_bias).float()[rows, columns]
        logits = (hidden.index_select(0, rows) * self.sub_weight.index_select(0, columns)).sum(-1).float()
        return logits + self.sub_bias.index_select(0, columns).float() if self.sub_bias is not None else logits


def log_softmax_by_group(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(C,) values -> (C,) values minus the log-sum-exp of their group (a log-softmax within each group).

    The 'trie' head's normalisation: ``values`` are the logits of the tokens that continue some trie nodes'
    prefixes, ``group`` (C,) the node (or beam) each belongs to. A group of one gets exactly 0."""
    if values.numel() == 0:
        return values
    top = torch.full((num_groups,), NEG_INF, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, group, values, reduce="amax", include_self=True)
    shifted = values - top[group]
    total = torch.zeros((num_groups,), dtype=values.dtype, device=values.device).index_add_(0, group, torch.exp(shifted))
    return shifted - torch.log(total)[group]


def _score_single_paths(lean: LeanDecoder | None, cache: BeamCache, scorer: NextTokenScorer, trie: TitleTrie,
                        head: str, nodes: torch.Tensor, alive: torch.Tensor, tokens: torch.Tensor,
                        positions: torch.Tensor, depth: int) -> torch.Tensor | None:
    """When every live row is on a title with one way left to go: the log-probs of the rest of its title, (rows, T),
    from one :meth:`~llmrec.fast_step.LeanDecoder.extend` pass; else None (and nothing is computed).

    The search's later steps would feed each row its title's tokens one at a time and read the log-prob of the
    next; a row's T inputs are known now (its step token, then its title up to the token before the end), so
    one pass over T tokens per row gives the same numbers. Only each live row's own tokens are computed (titles
    differ in length; a dead row has none). Column t holds the log-prob of the row's token ``depth + t`` (its
    title's end token last); columns past a shorter title's end hold 0 and are never read.

    Args:
        nodes, alive, tokens, positions: (rows,) per model row: its trie node, whether it is live, the token it
            appends now and its position.
        depth: tokens each row holds, the step token included.
    """
    items = trie.node_single_item[nodes]
    if lean is None or not bool((items[alive] >= 0).all()):
        return None
    items = torch.where(alive, items, torch.zeros_like(items))
    rest = torch.where(alive, trie.item_length[items] - depth, torch.zeros_like(items))  # the step token + the title's rest before its end
    count = int(rest.max())
    if count < 2:  # one token left to feed: an ordinary step
        return None
    scored = trie.item_tokens[items, depth : depth + count]  # (rows, T) the tokens whose log-probs are read
    fed = torch.cat([tokens[:, None], scored[:, :-1]], dim=1)
    steps = torch.arange(count, device=nodes.device)
    valid = steps[None, :] < rest[:, None]  # (rows, T): a row's own tokens (none for a dead row), not the padding
    hidden = lean.extend(cache, fed, positions[:, None] + steps, valid)  # (rows, T, d)
    columns = scored if head == "full" else torch.searchsorted(trie.vocabulary, scored)
    ahead = torch.zeros(valid.shape, device=hidden.device)
    where = torch.nonzero(valid.reshape(-1)).flatten()
    flat_hidden, flat_columns = hidden.reshape(-1, hidden.shape[-1]), columns.reshape(-1)
    for start in range(0, where.numel(), 1024):  # in chunks: a full head's log-probs are (tokens, V)
        chunk = where[start : start + 1024]
        ahead.view(-1)[chunk] = scorer(flat_hidden[chunk]).gather(1, flat_columns[chunk, None])[:, 0]
    return ahead


@torch.no_grad()
def constrained_beam_search(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    trie: TitleTrie,
    config: BeamSearchConfig,
    pad_id: int,
    excluded: Sequence[Sequence[int]] | None = None,
    scorer: NextTokenScorer | None = None,
    prior: torch.Tensor | None = None,
    prior_weight: float = 0.0,
    lean: LeanDecoder | None = None,
) -> list[list[tuple[int, float]]]:
    """Top-k catalog items for each prompt, as (catalog index, score) sorted by score.

    The score is log P_LLM(title + end | prompt), plus ``prior_weight`` × log P_prior(item) when a prior is
    given (D3's assisted decoding): at every step a candidate adds w × (log mass(child) − log mass(parent)) of
    the prior under the trie, so the terms telescope to w × log P_prior(item) at the end token and a beam's
    score still only falls along its path (the early stop below stays exact).

    Args:
        model: a causal LM in eval mode.
        prompts: B lists of prompt token ids.
        trie: the catalog trie (moved to the model's device by the caller or here).
        config: beams and k.
        pad_id: token used for left padding and for the inputs of dead beams (always masked or ignored).
        excluded: per prompt, catalog indices that must not be returned.
        scorer: a prebuilt :class:`NextTokenScorer` for ``config.head`` (saves gathering the head rows).
        prior: (B, num_items) log-probabilities of a text-free recommender (the assistant), normalised over
            the items a row may return.
        prior_weight: w above; 0 ignores the prior.
        lean: a prebuilt :class:`llmrec.fast_step.LeanDecoder` of ``model`` for ``config.step`` 'lean',
            'compiled' or 'graphs' (saves packing the weights per call; built here when not given; ignored for 'stock').
    """
    if config.num_beams < config.top_k:
        raise ValueError(f"num_beams ({config.num_beams}) must be >= top_k ({config.top_k})")
    device = next(model.parameters()).device
    if trie.child_tokens.device != device:
        trie = trie.to(device)
    batch, beams, top_k = len(prompts), config.num_beams, config.top_k
    if batch == 0:
        return []

    # ---- prompt pass: left-padded, one row per user ----
    length = max(len(p) for p in prompts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention[row, length - len(prompt) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    if scorer is None or scorer.head != config.head:
        scorer = NextTokenScorer(model, trie, config.head)
    token_column = trie.child_tokens if config.head == "full" else trie.child_local  # column of an edge's token
    per_node = config.head == "trie"
    decoder = model.get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    # (B, d) the last hidden states: the 'trie' head reads only its candidates' logits from them; the others' (B, V)
    # or (B, U) next-token log-probs
    head_input = out.last_hidden_state[:, -1, :]
    logprobs = None if per_node else scorer(head_input)

    # ---- B * beams search rows from here on; the prompt cache stays one copy per user ----
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    # The row of `logprobs` (the last model call's output) that holds each search row's next-token scores: the
    # user's prompt-pass row first, then the row the search row was computed in (rows are narrowed to live beams)
    row_slot = expand
    every_row = torch.arange(batch * beams, device=device)
    next_position = positions[expand, -1] + 1  # (B*K,)
    if config.step == "stock":
        lean = None
    elif lean is None:
        lean = lean_decoder_for(model, config.step)
    if lean is not None:
        beam_cache = lean.start(out.past_key_values, attention.bool(), beams, next_position, trie.max_depth)
    else:
        cache = prefix_beam_cache(out.past_key_values, attention.bool(), beams, trie.max_depth)
    narrow = config.narrow and lean is not None and not lean.static  # the eager lean step's shapes may change per step
    # (model rows, T) log-probs of the rest of every live title, once all have one way left (None before)
    ahead: torch.Tensor | None = None
    ahead_offset = 0
    cache_users = torch.arange(batch, device=device)  # the users whose rows the narrowed beam cache holds, ascending
    nodes = torch.zeros(batch * beams, dtype=torch.long, device=device)
    scores = torch.full((batch * beams,), NEG_INF, device=device)
    scores[::beams] = 0.0

    # (B, num_nodes) reachable non-excluded items per node; an excluded item's own end node holds 0, so
    # masking candidates by it also keeps excluded items out of the results.
    available = trie.available(excluded) if excluded is not None else None
    # (B, num_nodes) w × log prior mass under each node (None: pure LLM scores)
    node_prior = trie.node_log_mass(prior.to(device)) * prior_weight if prior is not None and prior_weight else None

    pool_scores = torch.full((batch, top_k), NEG_INF, device=device)
    pool_items = torch.full((batch, top_k), -1, dtype=torch.long, device=device)

    for _step in range(trie.max_depth):
        live = torch.isfinite(scores)
        beam, edge = trie.expand_edges(nodes, live)
        token, child = trie.child_tokens[edge], trie.child_nodes[edge]
        if ahead is not None:  # every live beam has one way left: its token's score was computed ahead
            token_scores = ahead[row_slot[beam], ahead_offset]
        else:
            if per_node:  # the 'trie' head: the allowed continuations' logits, a log-softmax over each beam's
                token_scores = log_softmax_by_group(scorer.selected_logits(head_input, row_slot[beam], token_column[edge]),
                                                    beam, nodes.numel())
            else:
                assert logprobs is not None
                token_scores = logprobs[row_slot[beam], token_column[edge]]
        cand_scores = scores[beam] + token_scores  # (C,)
        user = torch.div(beam, beams, rounding_mode="floor")
        if node_prior is not None:  # the prior's share of the step: log mass(child) − log mass(parent)
            parent_mass = node_prior[user, nodes[beam]]  # finite: a live beam's subtree holds returnable items
            cand_scores = cand_scores + (node_prior[user, child] - parent_mass)
        if available is not None:  # never step into a subtree holding only excluded items
            cand_scores = cand_scores.masked_fill(available[user, child] <= 0, NEG_INF)

        # Candidates that emit the end token complete an item. Under the 'trie' head so does every candidate whose
        # title has one way left (the end token's node included): the rest of its title adds log 1 = 0 per token,
        # and the prior's share 0 too (one item's mass all the way down), so its score is final now, its item joins
        # the finished ones and no model call runs for the rest of its title.
        if per_node:
            finished_item = trie.node_single_item[child]
            ends = finished_item >= 0
        else:
            ends = token == trie.end_id
            finished_item = trie.node_item[child]
        if bool(ends.any()):
            best, where = grouped_topk(user[ends], cand_scores[ends], batch, top_k)
            merged_scores = torch.cat([pool_scores, best], dim=1)
            merged_items = torch.cat([pool_items, torch.where(torch.isfinite(best), finished_item[ends][where], -1)], dim=1)
            pool_scores, order = merged_scores.topk(top_k, dim=1)
            pool_items = merged_items.gather(1, order)

        # The best `beams` unfinished continuations per user become the next beams.
        cont_scores = cand_scores.masked_fill(ends, NEG_INF)
        new_scores, where = grouped_topk(user, cont_scores, batch, beams)  # (B, K)
        new_scores = new_scores.reshape(-1)
        where = where.reshape(-1)
        alive = torch.isfinite(new_scores)
        # Stop users whose k-th finished item beats every live prefix (scores only fall along a path).
        best_live = new_scores.view(batch, beams).max(dim=1).values
        done = pool_scores[:, -1] >= best_live
        if bool(done.all()):
            break
        new_scores = torch.where(done.repeat_interleave(beams), NEG_INF, new_scores)
        alive = alive & torch.isfinite(new_scores)
        if beam.numel() == 0 or not bool(alive.any()):
            break
        parent = torch.where(alive, beam[where], every_row)
        step_tokens = torch.where(alive, token[where], torch.full_like(where, pad_id))
        nodes = torch.where(alive, child[where], torch.zeros_like(where))
        scores = new_scores

        step_positions = next_position[parent]
        next_position = step_positions + 1
        if ahead is not None:  # no model call: each row follows its parent's title, one token further
            row_slot = row_slot[parent]
            ahead_offset += 1
            continue
        if narrow:
            # grouped_topk sorts each user's beams by score, so its live ones are its first rows: keep the first
            # `width` of every user that has live beams, width the most any has (a dead row, or a finished
            # user's, costs as much to compute as a live one)
            counts = alive.view(batch, beams).sum(dim=1)
            users = torch.nonzero(counts > 0).flatten()  # a finished user never has live beams again
            width = int(counts.max())
            kept = (users[:, None] * beams + torch.arange(width, device=device)).reshape(-1)
            # the cache rows the kept rows continue (before the first step the suffix is empty: nothing to move)
            beam_cache.reorder(row_slot[parent[kept]], width,
                               users=torch.searchsorted(cache_users, users) if users.numel() < cache_users.numel() else None)
            cache_users = users
            row_slot = torch.zeros_like(row_slot)  # a dropped row is dead: it is never read
            row_slot[kept] = torch.arange(kept.numel(), device=device)
            # (never under the 'trie' head: a title with one way left is finished without the model)
            ahead = None if per_node else _score_single_paths(lean, beam_cache, scorer, trie, config.head, nodes[kept],
                                                              alive[kept], step_tokens[kept], step_positions[kept], _step + 1)
            if ahead is not None:
                ahead_offset = 0
                continue
            hidden = lean.step(beam_cache, step_tokens[kept], step_positions[kept])  # type: ignore[union-attr]
        elif lean is not None:
            beam_cache.reorder(parent)
            hidden = lean.step(beam_cache, step_tokens, step_positions)
            row_slot = every_row
        else:
            cache.reorder_cache(parent)  # type: ignore[arg-type]
            with prefix_beam_attention_enabled(model):
                out = decoder(input_ids=step_tokens[:, None], position_ids=step_positions[:, None], past_key_values=cache,
                              use_cache=True)
            hidden = out.last_hidden_state[:, -1, :]
            row_slot = every_row
        head_input = hidden
        logprobs = None if per_node else scorer(hidden)

    results: list[list[tuple[int, float]]] = []
    for row in range(batch):
        ranked = [
            (int(item), float(score))
            for item, score in zip(pool_items[row].tolist(), pool_scores[row].tolist(), strict=True)
            if item >= 0 and score > NEG_INF
        ]
        results.append(ranked)
    return results
