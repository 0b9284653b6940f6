"""Exact ranking: every catalog title scored by its exact log P(title + end | prompt), no beam approximation.

Beam search keeps ``num_beams`` prefixes per step, so a title whose first token ranks below the beam width
is never scored even when its whole-title probability is among the best (on the demo model a user's true
first title had its first token at rank 23 of the step: 20 beams dropped it). Here the whole catalog is
scored, each title prefix computed once:

- the prompt runs once (its KV cache kept);
- the title trie then runs level by level: the nodes at depth d are one batch of tokens at position
  ``P + d - 1``, appended to the cache, each attending to the prompt and to its own ancestors only (a 4D
  additive mask over the cache, which holds the prompt and every earlier level);
- an edge's log-probability comes from its parent's hidden state through the same
  :class:`llmrec.decode.NextTokenScorer` as the beam search (so the head modes mean the same), and an item's
  score is the sum along its path (end token included), i.e. what beam search computes for the titles it
  reaches. With as many beams as items, beam search returns exactly these scores (``tests/llmrec``).

Cost: one forward pass over the trie's nodes per user (ml-100k: about 8k nodes for 1,682 titles) instead of
``max_depth`` steps of ``num_beams`` tokens; users run one at a time (the cache grows with the trie).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from llmrec.decode import NEG_INF, NextTokenScorer, TitleTrie


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
        return cls(levels, parent, token, slot, ancestors)


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
    chunk: int = 1024,
) -> list[list[tuple[int, float]]]:
    """Top-k catalog items for each prompt by exact score, as (catalog index, log-probability), best first.

    ``chunk`` bounds the rows put through the output head at once (memory: chunk × vocabulary)."""
    device = next(model.parameters()).device
    if trie.child_tokens.device != device:
        trie = trie.to(device)
    scorer = scorer if scorer is not None and scorer.head == head else NextTokenScorer(model, trie, head)
    levels = levels or TrieLevels.of(trie)
    column_of = (lambda t: t) if head == "full" else (lambda t: torch.searchsorted(trie.vocabulary, t))
    decoder = model.get_decoder()
    dtype = next(model.parameters()).dtype
    results = []
    for row, prompt in enumerate(prompts):
        scores = _score_every_item(decoder, scorer, trie, levels, list(prompt), column_of, dtype, device, chunk)
        if excluded is not None:
            drop = [int(i) for i in excluded[row] if 0 <= int(i) < scores.numel()]
            if drop:
                scores[torch.as_tensor(drop, device=scores.device)] = NEG_INF
        best, items = scores.topk(min(top_k, scores.numel()))
        results.append([(int(i), float(s)) for i, s in zip(items.tolist(), best.tolist(), strict=True) if s > NEG_INF])
    return results


def _score_every_item(decoder: torch.nn.Module, scorer: NextTokenScorer, trie: TitleTrie, levels: TrieLevels,
                      prompt: list[int], column_of: object, dtype: torch.dtype, device: torch.device,
                      chunk: int) -> torch.Tensor:
    """(num_items,) log P(title + end | prompt) of every catalog item."""
    length = len(prompt)
    cache = DynamicCache()
    out = decoder(input_ids=torch.tensor([prompt], device=device), use_cache=True, past_key_values=cache)
    edge_logprob = torch.zeros(trie.num_nodes, device=device)  # (num_nodes,) log p of the edge into each node
    parent_hidden = {0: out.last_hidden_state[0, -1:]}  # root: the prompt's last state
    minimum = torch.finfo(dtype).min
    parent, token = levels.parent.to(device), levels.token.to(device)
    ancestors, slot = levels.ancestors.to(device), levels.slot.to(device)
    hidden_of_node = torch.zeros(0)
    done = 0  # trie tokens already in the cache
    for depth, nodes_cpu in enumerate(levels.levels, start=1):
        nodes = nodes_cpu.to(device)
        # the edge log-probabilities into this level, from the parents' states (root, or the previous level)
        parents = parent[nodes]
        if depth == 1:
            states = parent_hidden[0].expand(nodes.numel(), -1)
        else:
            states = hidden_of_node[slot[parents] - slot[levels.levels[depth - 2][0].to(device)]]
        for start in range(0, nodes.numel(), chunk):
            part = slice(start, start + chunk)
            logprobs = scorer(states[part])  # (n, V) or (n, U)
            edge_logprob[nodes[part]] = logprobs.gather(1, column_of(token[nodes[part]])[:, None]).squeeze(1)  # type: ignore[operator]
        # this level's tokens through the model: each attends to the prompt and to its ancestors (and itself)
        count = nodes.numel()
        kv_length = length + done + count
        mask = torch.full((count, kv_length), minimum, dtype=dtype, device=device)
        mask[:, :length] = 0
        chain = ancestors[nodes, :depth]  # (count, depth): nodes at depths 1..d on each path, itself last
        mask.scatter_(1, length + slot[chain], 0.0)
        positions = torch.full((1, count), length + depth - 1, dtype=torch.long, device=device)
        out = decoder(input_ids=token[nodes][None], position_ids=positions, attention_mask=mask[None, None],
                      past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(length + done, kv_length, device=device))
        hidden_of_node = out.last_hidden_state[0]  # (count, d), in this level's order
        done += count
    paths = trie.item_paths.to(device)  # (num_items, max_depth), 0 (root) as padding: its edge log-prob is 0
    return edge_logprob[paths].sum(1)
