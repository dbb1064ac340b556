"""Base model vs adapter on the same prompt, greedy, side by side.

Models load through ``peftlab.api.load`` (any registered method, chained adapters) and reply
through the same generation code as ``peftlab chat``. The last few loaded models are kept, so
asking again is quick; one lock, so two browser tabs do not load the same model twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from peftlab.api import load
from peftlab.evaluation.generate import generate_replies
from peftlab.ui.runs import read_config

# tasks whose adapter sits on a causal LM that can answer a prompt
CHAT_TASKS = ("sft", "dpo", "orpo", "simpo", "kto", "grpo", "ppo", "pretrain")
MAX_NEW_TOKENS = 512


class ChatService:
    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._models: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, model: str, adapter: Path | None) -> Any:
        key = (model, str(adapter) if adapter else None)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        loaded = load(model, adapter=adapter)
        self._models[key] = loaded
        while len(self._models) > self.keep:
            self._models.popitem(last=False)
        return loaded

    def compare(self, run: Path, prompt: str, max_new_tokens: int = 64,
                system: str | None = None) -> dict[str, str]:
        """``{"base": reply, "adapter": reply}`` to ``prompt`` (greedy)."""
        if not prompt.strip():
            raise ValueError("chat: the prompt is empty")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"chat: max_new_tokens must be in [1, {MAX_NEW_TOKENS}], "
                             f"got {max_new_tokens}")
        config = read_config(run)
        task = config.get("task", "sft")
        if task not in CHAT_TASKS or (config.get("pretrain") or {}).get("objective") == "mlm":
            raise ValueError(f"chat: run {run.name!r} is a {task!r} run; chat needs an adapter "
                             f"on a causal LM (task one of {', '.join(CHAT_TASKS)})")
        adapter = run / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"chat: run {run.name!r} has no saved adapter yet (not finished)")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        replies = {}
        with self._lock, torch.inference_mode():
            for side, path in (("base", None), ("adapter", adapter)):
                model, tokenizer = self._get(str(config["model"]), path)
                replies[side] = generate_replies(model, tokenizer, [messages],
                                                 max_new_tokens=max_new_tokens,
                                                 do_sample=False)[0]
        return replies
