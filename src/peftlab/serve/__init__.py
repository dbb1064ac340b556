"""Serving: one base model and many LoRA adapters behind an OpenAI-compatible HTTP API
(``server``: FastAPI + uvicorn), continuously batched across adapters (``scheduler``,
``batch``, ``prefix_cache``) by the ``engine``."""
