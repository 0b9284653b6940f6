"""The LLM recommender: model loading, prompt encoding, constrained top-k decoding, artifacts.

Used by ``pruning`` (offline) and ``app`` (online); imports neither.
"""
