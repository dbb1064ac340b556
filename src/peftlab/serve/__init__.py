"""Serving: one base model and many LoRA adapters behind an OpenAI-compatible HTTP API."""
