"""One base model, many LoRA adapters: the generation side of ``peftlab serve``.

Every adapter is loaded once into the same base model under its own name (the weights of
the base are shared, each adapter adds only its low-rank matrices); a request names the
adapter (or the base) and the engine switches the active adapter before generating.
Requests are served one at a time under a lock: switching adapters mid-batch is not
possible with a single active adapter, and on a CPU one generation already uses every core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from peftlab.data.sft import encode_prompt
from peftlab.evaluation.generate import stop_token_ids
from peftlab.methods import lora, method_for_adapter_dir
from peftlab.methods.chain import recorded_chain
from peftlab.models import load_model


class RequestError(ValueError):
    """A bad request: the message is shown to the client (HTTP 4xx)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


class Engine:
    """The base model under ``base_name`` plus named LoRA adapters (peft format dirs)."""

    def __init__(self, model: str, adapters: dict[str, str | Path] | None = None,
                 base_name: str | None = None, max_tokens_limit: int = 2048):
        self.model, self.tokenizer = load_model(model)
        self.model.eval()
        self.base_name = base_name or str(model)
        self.max_tokens_limit = max_tokens_limit
        self.adapters: dict[str, Path] = {}
        for name, directory in (adapters or {}).items():
            directory = Path(directory)
            if name == self.base_name:
                raise ValueError(f"adapter name {name!r} is the base model's name; pick another")
            method = method_for_adapter_dir(directory)
            if recorded_chain(directory):
                raise ValueError(f"{directory}: trained on top of other adapters (init_from), so "
                                 "it needs its own base; export it merged (peftlab export --hf) "
                                 "and serve that")
            if method.name != "lora":
                raise ValueError(f"{directory}: a {method.name} adapter; serving switches between "
                                 "LoRA adapters only (merge or serve others on their own)")
            cfg = lora.load_lora(self.model, directory, adapter_name=name)
            if cfg.modules_to_save:
                raise ValueError(f"{directory}: the adapter also trains {cfg.modules_to_save} "
                                 "(modules_to_save), which cannot be switched per request")
            self.adapters[name] = directory
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.lock = threading.Lock()

    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def _activate(self, model_id: str):
        """Context in which ``model_id`` (the base or an adapter) computes."""
        if model_id == self.base_name:
            return lora.disable_adapters(self.model) if self.adapters else nullcontext()
        if model_id not in self.adapters:
            raise RequestError(f"model {model_id!r} does not exist; available: "
                               f"{self.model_ids()}", param="model", status=404)
        lora.set_adapter(self.model, model_id)
        for p in self.model.parameters():  # serving never trains
            p.requires_grad_(False)
        return nullcontext()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(messages, self.tokenizer)

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def _generate_kwargs(self, ids: list[int], sampling: Sampling) -> dict:
        if not 1 <= sampling.max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be between 1 and {self.max_tokens_limit}, got "
                               f"{sampling.max_tokens}", param="max_tokens")
        kwargs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                                 dtype=torch.long),
                  "max_new_tokens": sampling.max_tokens, "eos_token_id": self.stop_ids,
                  "pad_token_id": self.tokenizer.pad_token_id}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def complete(self, model_id: str, ids: list[int], sampling: Sampling) -> Completion:
        kwargs = self._generate_kwargs(ids, sampling)
        with self.lock, torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with self._activate(model_id):
                out = self.model.generate(**kwargs)[0, len(ids):].tolist()
        return self._finish(ids, out, sampling)

    def stream(self, model_id: str, ids: list[int], sampling: Sampling) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then the finished :class:`Completion`.

        Closing the iterator early (the client went away) stops generation at the next
        token, so the lock is never released while the model is still busy.
        """
        kwargs = self._generate_kwargs(ids, sampling)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        cancel = threading.Event()

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        generated: list[list[int]] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad(), self._activate(model_id):
                    out = self.model.generate(**kwargs, streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([_Cancelled()]))
                generated.append(out[0, len(ids):].tolist())
            except BaseException as exc:  # re-raised in the request thread
                errors.append(exc)
                streamer.end()

        with self.lock:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                cancel.set()
                thread.join()
        if errors:
            raise errors[0]
        yield self._finish(ids, generated[0], sampling)

    def _finish(self, ids: list[int], out: list[int], sampling: Sampling) -> Completion:
        """Cut at the first stop token; its text is not part of the answer."""
        stopped = False
        for i, tok in enumerate(out):
            if tok in self.stop_ids:
                out, stopped = out[:i], True
                break
        finish = "stop" if stopped or len(out) < sampling.max_tokens else "length"
        return Completion(self.tokenizer.decode(out, skip_special_tokens=True), len(ids),
                          len(out) + int(stopped), finish)
