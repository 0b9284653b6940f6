"""Exact ranking: every catalog title scored by its exact log P(title + end | prompt), no beam approximation.

Beam search keeps ``num_beams`` prefixes per step, so a title whose first token ranks below the beam width
is never scored even when its whole-title probability is among the best (on the demo model a user's true
first title had its first token at rank 23 of the step: 20 beams dropped it). Here the whole catalog is
scored, each title prefix computed once:

- the prompt runs once (its KV cache kept);
- the title trie then runs as rows of first-token subtrees over copies of the prompt's cache: each node is a
  token at position ``P + depth - 1`` attending to the prompt and to its own ancestors only (a 4D additive
  mask), so attention costs each subtree's size squared rather than the whole trie's;
- an edge's log-probability comes from its parent's hidden state through the same
  :class:`llmrec.decode.NextTokenScorer` as the beam search (so the head modes mean the same), and an item's
  score is the sum along its path (end token included), i.e. what beam search computes for the titles it
  reaches. With as many beams as items, beam search returns exactly these scores (``tests/llmrec``).

Cost: one forward pass over the trie's nodes per user (ml-100k: 17,909 nodes for 1,682 titles) instead of
``max_depth`` steps of ``num_beams`` tokens; users run one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from llmrec.decode import NEG_INF, NextTokenScorer, TitleTrie, log_softmax_by_group


@dataclass
class TrieLevels:
    """The trie's non-root nodes by depth, with what the level-by-level pass needs."""

    levels: list[torch.Tensor]
    """levels[d - 1]: (N_d,) the nodes at depth d, in cache order."""
    parent: torch.Tensor
    """(num_nodes,) parent of each node (-1 for the root)."""
    token: torch.Tensor
    """(num_nodes,) the token on the edge into each node (-1 for the root)."""
    slot: torch.Tensor
    """(num_nodes,) the node's position among all non-root nodes in cache order (-1 for the root)."""
    ancestors: torch.Tensor
    """(num_nodes, max_depth) each node's non-root ancestors and itself, by depth (index d - 1), -1 below."""
    depth: torch.Tensor
    """(num_nodes,) depth of each node (0 for the root)."""
    _passes: dict[int, list[SubtreePass]] = field(default_factory=dict, repr=False)

    def passes(self, tokens_per_pass: int) -> list[SubtreePass]:
        """The first-token subtrees, smallest first, grouped into passes of about ``tokens_per_pass`` tokens
        (rows × the longest row; a subtree longer than that is a pass of its own). Built once per size."""
        if tokens_per_pass not in self._passes:
            self._passes[tokens_per_pass] = self._group(tokens_per_pass)
        return self._passes[tokens_per_pass]

    def _group(self, tokens_per_pass: int) -> list[SubtreePass]:
        roots = self.levels[0] if self.levels else torch.empty(0, dtype=torch.long)
        order = torch.cat(self.levels) if self.levels else torch.empty(0, dtype=torch.long)  # level order
        owner = self.ancestors[order, 0]  # the first-token subtree of each node
        members = {int(r): order[owner == r] for r in roots.tolist()}
        sized = sorted(members, key=lambda r: members[r].numel())
        passes: list[SubtreePass] = []
        current: list[int] = []
        for root in sized:
            width = members[root].numel()
            if current and width * (len(current) + 1) > tokens_per_pass:
                passes.append(SubtreePass.of([members[r] for r in current], self))
                current = []
            current.append(root)
        if current:
            passes.append(SubtreePass.of([members[r] for r in current], self))
        return passes

    @classmethod
    def of(cls, trie: TitleTrie) -> TrieLevels:
        offsets, tokens, children = (t.cpu() for t in (trie.child_offsets, trie.child_tokens, trie.child_nodes))
        count = trie.num_nodes
        parent = torch.full((count,), -1, dtype=torch.long)
        token = torch.full((count,), -1, dtype=torch.long)
        degree = offsets[1:] - offsets[:-1]
        parent[children] = torch.repeat_interleave(torch.arange(count), degree)
        token[children] = tokens
        depth = torch.zeros(count, dtype=torch.long)
        ancestors = torch.full((count, max(trie.max_depth, 1)), -1, dtype=torch.long)
        levels: list[torch.Tensor] = []
        frontier = torch.tensor([0])
        while True:
            nodes = torch.cat([children[offsets[n] : offsets[n + 1]] for n in frontier.tolist()]) if frontier.numel() else frontier
            if nodes.numel() == 0:
                break
            depth[nodes] = depth[parent[nodes]] + 1
            d = len(levels) + 1
            ancestors[nodes] = ancestors[parent[nodes]]
            ancestors[nodes, d - 1] = nodes
            levels.append(nodes)
            frontier = nodes
        slot = torch.full((count,), -1, dtype=torch.long)
        order = torch.cat(levels) if levels else torch.empty(0, dtype=torch.long)
        slot[order] = torch.arange(order.numel())
        return cls(levels, parent, token, slot, ancestors, depth)


@dataclass
class SubtreePass:
    """Several first-token subtrees as the rows of one batch."""

    roots: list[int]
    width: int
    """The longest row (nodes)."""
    nodes: torch.Tensor
    """(rows, width) the nodes of each row in level order, -1 as padding."""
    allowed: torch.Tensor
    """(rows, width, width) bool: column j is an ancestor of row position i, or i itself."""
    child_row: torch.Tensor
    """(C,) for every node with a parent in the row: its row,"""
    child_col: torch.Tensor
    """(C,) its column,"""
    parent_col: torch.Tensor
    """(C,) and its parent's column."""

    @classmethod
    def of(cls, subtrees: list[torch.Tensor], levels: TrieLevels) -> SubtreePass:
        width = max(int(t.numel()) for t in subtrees)
        rows = len(subtrees)
        nodes = torch.full((rows, width), -1, dtype=torch.long)
        allowed = torch.zeros((rows, width, width), dtype=torch.bool)
        child_row, child_col, parent_col = [], [], []
        for row, members in enumerate(subtrees):
            n = int(members.numel())
            nodes[row, :n] = members
            column = {int(node): i for i, node in enumerate(members.tolist())}
            chains = levels.ancestors[members]  # (n, max_depth)
            for i, chain in enumerate(chains.tolist()):
                for ancestor in chain:
                    if ancestor < 0:
                        break
                    allowed[row, i, column[ancestor]] = True
            for i, node in enumerate(members.tolist()):
                parent = int(levels.parent[node])
                if parent in column:
                    child_row.append(row)
                    child_col.append(i)
                    parent_col.append(column[parent])
            allowed[row, n:, :] = False  # padding sees the prompt only
        return cls([int(t[0]) for t in subtrees], width, nodes, allowed, torch.tensor(child_row, dtype=torch.long),
                   torch.tensor(child_col, dtype=torch.long), torch.tensor(parent_col, dtype=torch.long))


@torch.no_grad()
def exact_rank(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    trie: TitleTrie,
    top_k: int,
    excluded: Sequence[Sequence[int]] | None = None,
    scorer: NextTokenScorer | None = None,
    head: str = "catalog",
    levels: TrieLevels | None = None,
    tokens_per_pass: int = 4096,
    prior: torch.Tensor | None = None,
    prior_weight: float = 0.0,
) -> list[list[tuple[int, float]]]:
    """Top-k catalog items for each prompt by exact score, as (catalog index, log-probability), best first.

    ``tokens_per_pass`` bounds the trie tokens (subtree rows × their length) put through the model at once.
    ``prior`` (B, num_items) and ``prior_weight`` add w × log P_prior(item), as assisted beam search does."""
    device = next(model.parameters()).device
    if trie.child_tokens.device != device:
        trie = trie.to(device)
    scorer = scorer if scorer is not None and scorer.head == head else NextTokenScorer(model, trie, head)
    levels = levels or TrieLevels.of(trie)
    results = []
    for row, prompt in enumerate(prompts):
        scores = _score_every_item(model, scorer, trie, levels, list(prompt), head, device, tokens_per_pass)
        if prior is not None and prior_weight:
            scores = scores + prior_weight * prior[row].to(scores.device, scores.dtype)
        if excluded is not None:
            drop = [int(i) for i in excluded[row] if 0 <= int(i) < scores.numel()]
            if drop:
                scores[torch.as_tensor(drop, device=scores.device)] = NEG_INF
        best, items = scores.topk(min(top_k, scores.numel()))
        results.append([(int(i), float(s)) for i, s in zip(items.tolist(), best.tolist(), strict=True) if s > NEG_INF])
    return results


def _score_every_item(model: PreTrainedModel, scorer: NextTokenScorer, trie: TitleTrie, levels: TrieLevels,
                      prompt: list[int], head: str, device: torch.device, tokens_per_pass: int) -> torch.Tensor:
    """(num_items,) log P(title + end | prompt) of every catalog item.

    The trie's first-token subtrees are the rows of a batch (sorted by size, several per pass): a row holds
    one subtree's nodes in level order after the shared prompt cache, each node at position P + depth − 1,
    attending to the prompt and to its ancestors in the row (4D mask). Attention then costs each subtree's
    size squared, not the whole trie's."""
    decoder = model.get_decoder()
    dtype = next(model.parameters()).dtype
    length = len(prompt)
    cache = DynamicCache()
    out = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True, past_key_values=cache)
    root_state = out.last_hidden_state[0, -1]  # (d,)
    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer, each (1, heads, P, head_dim)
    for layer in cache.layers:
        assert layer.keys is not None and layer.values is not None
        prompt_kv.append((layer.keys, layer.values))
    edge_logprob = torch.zeros(trie.num_nodes, device=device)  # log p of the edge into each node
    column = (lambda t: t) if head == "full" else (lambda t: torch.searchsorted(trie.vocabulary, t))
    token = levels.token.to(device)
    minimum = torch.finfo(dtype).min

    # the edges out of the root: one scorer call on the prompt's last state
    first = levels.levels[0].to(device)
    edge_logprob[first] = scorer(root_state[None])[0, column(token[first])]
    for group in levels.passes(tokens_per_pass):
        rows, width = len(group.roots), group.width
        nodes = group.nodes.to(device)  # (rows, width), -1 where a row is shorter
        real = nodes >= 0
        safe = nodes.clamp(min=0)
        input_ids = torch.where(real, token[safe], torch.zeros_like(safe))
        positions = torch.where(real, length + levels.depth.to(device)[safe] - 1, torch.full_like(safe, length))
        mask = torch.full((rows, 1, width, length + width), minimum, dtype=dtype, device=device)
        mask[:, :, :, :length] = 0  # every token sees the prompt
        allowed = group.allowed.to(device)  # (rows, width, width) bool: ancestor-or-self within the row
        mask[:, 0, :, length:] = torch.where(allowed, 0.0, minimum).to(dtype)
        legacy = tuple((k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prompt_kv)
        expanded = DynamicCache.from_legacy_cache(legacy)  # type: ignore[arg-type]
        hidden = decoder(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=expanded,
                         use_cache=True, cache_position=torch.arange(length, length + width, device=device)).last_hidden_state
        # each node's state scores the edges to its children (in the same row)
        child_row, child_col, parent_col = (t.to(device) for t in (group.child_row, group.child_col, group.parent_col))
        if child_row.numel():
            states = hidden[child_row, parent_col]  # (C, d)
            children = nodes[child_row, child_col]
            for start in range(0, children.numel(), 1024):
                part = slice(start, start + 1024)
                logprobs = scorer(states[part])
                edge_logprob[children[part]] = logprobs.gather(1, column(token[children[part]])[:, None]).squeeze(1)
    if head == "trie":  # each edge normalised over its siblings (the 'trie' head: log P(item) over the catalog)
        parent = levels.parent.to(device)
        below = torch.nonzero(parent >= 0).flatten()
        edge_logprob[below] = log_softmax_by_group(edge_logprob[below], parent[below], trie.num_nodes)
    paths = trie.item_paths.to(device)  # (num_items, max_depth), 0 (root) as padding: its edge log-prob is 0
    return edge_logprob[paths].sum(1)
