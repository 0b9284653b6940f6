"""The online service: FastAPI routes, settings, model registry, A/B router, micro-batching, telemetry.

Never imports training code (``pruning``, peft, accelerate); artifacts are loaded through ``llmrec``.
"""
