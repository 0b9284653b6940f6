"""Interaction data for generative recommenders: readers, preparation, prompts, catalog, metrics.

No model code lives here (DESIGN.md §2): `recdata ← llmrec ← pruning`.
"""
