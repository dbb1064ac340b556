"""One base model, many LoRA adapters, many requests at once: the generation side of
``peftlab serve``.

Every adapter is loaded once into the same base model under its own name (the base weights
are shared, each adapter adds only its low-rank matrices) and all of them are attached for
per-row use, so one decode batch mixes requests for different adapters and for the base.
The :class:`~peftlab.serve.scheduler.Scheduler` thread owns the model; the engine checks a
request, submits it as a job and turns the job's token events into text (:class:`Reply`).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from peftlab.data.sft import encode_prompt
from peftlab.evaluation.generate import stop_token_ids
from peftlab.methods import lora, method_for_adapter_dir
from peftlab.methods.chain import recorded_chain
from peftlab.models import load_model
from peftlab.runtime.precision import prepare_inference
from peftlab.serve.scheduler import Event, Job, NotRunning, QueueFull, Sampling, Scheduler
from peftlab.serve.text import TextStream

__all__ = ["Completion", "Engine", "Reply", "RequestError", "Sampling"]


class RequestError(ValueError):
    """A request the server refuses: the message is shown to the client as is (so it never
    holds a local path), with an HTTP status and OpenAI's error ``type``/``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


class Engine:
    """The base model under ``base_name`` plus named LoRA adapters (peft format dirs).

    ``max_batch`` requests decode together; up to ``max_queue`` more wait (then 429);
    ``prefill_chunk`` tokens of a new prompt run per step; a request still running after
    ``request_timeout`` seconds is dropped; up to ``prefix_cache`` shared prompt prefixes
    keep their KV cache (0: off). ``precision``: ``auto`` decodes in bf16 where bf16
    matmuls are clearly faster (see :func:`~peftlab.runtime.precision.prepare_inference`),
    else fp32. ``packed_weights``: while it runs, linear layers on a CPU use a copy of their
    weights packed for the matmul kernel (faster decoding; the weights' size again in RAM).
    Call :meth:`start` (or use ``with``) to run it.
    """

    def __init__(self, model: str, adapters: dict[str, str | Path] | None = None,
                 base_name: str | None = None, max_tokens_limit: int = 2048,
                 max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 256,
                 request_timeout: float | None = 600.0, prefix_cache: int = 32,
                 precision: str = "auto", packed_weights: bool = True):
        adapters = adapters or {}
        self.base_name = base_name or public_name(model)
        for name in adapters:
            if name == self.base_name:
                raise ValueError(f"adapter name {name!r} is the base model's name; pick another")
        self.model, self.tokenizer = load_model(model)
        self.model.eval()
        self.max_tokens_limit = max_tokens_limit
        self.request_timeout = request_timeout
        self.adapters: dict[str, Path] = {}
        for name, directory in adapters.items():
            directory = Path(directory)
            method = method_for_adapter_dir(directory)
            if recorded_chain(directory):
                raise ValueError(f"{directory}: trained on top of other adapters (init_from), so "
                                 "it needs its own base; export it merged (peftlab export --hf) "
                                 "and serve that")
            if method.name != "lora":
                raise ValueError(f"{directory}: a {method.name} adapter; serving batches LoRA "
                                 "adapters only (merge or serve others on their own)")
            cfg = lora.load_lora(self.model, directory, adapter_name=name)
            if cfg.modules_to_save:
                raise ValueError(f"{directory}: the adapter also trains {cfg.modules_to_save} "
                                 "(modules_to_save), which cannot be switched per request")
            self.adapters[name] = directory
        self.model.requires_grad_(False)  # serving never trains
        # before the row stacks: they are copies in the base weights' dtype
        self.precision = prepare_inference(self.model, precision)
        route = lora.attach_row_adapters(self.model, list(self.adapters)) if self.adapters else None
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0)
                                  or 1 << 30)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.scheduler = Scheduler(self.model, route, self.stop_ids, max_batch=max_batch,
                                   max_queue=max_queue, prefill_chunk=prefill_chunk,
                                   prefix_cache=prefix_cache, packed_weights=packed_weights)

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> Engine:
        self.scheduler.start()
        return self

    def close(self) -> None:
        self.scheduler.stop()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_prompt(messages, self.tokenizer)

    def encode_text(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def check_model(self, model_id: str) -> None:
        if model_id not in self.model_ids():
            raise RequestError(f"model {model_id!r} does not exist; available: "
                               f"{self.model_ids()}", param="model", status=404,
                               code="model_not_found")

    def check(self, model_id: str, ids: list[int], sampling: Sampling) -> None:
        """Refuse what cannot run (unknown model, max_tokens, context) before any work."""
        self.check_model(model_id)
        if not 1 <= sampling.max_tokens <= self.max_tokens_limit:
            raise RequestError(f"max_tokens must be between 1 and {self.max_tokens_limit}, got "
                               f"{sampling.max_tokens}", param="max_tokens")
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        if len(ids) + sampling.max_tokens > self.context_length:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens "
                               f"({sampling.max_tokens}) exceeds the model's context of "
                               f"{self.context_length} tokens", param="max_tokens",
                               code="context_length_exceeded")

    def submit(self, model_id: str, ids: list[int], sampling: Sampling,
               emit: Callable[[Event], None]) -> Job:
        """Check and queue a request; its events go to ``emit`` (on the scheduler thread)."""
        self.check(model_id, ids, sampling)
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        job = Job(adapter=None if model_id == self.base_name else model_id, prompt=list(ids),
                  sampling=sampling, emit=emit, deadline=deadline)
        try:
            return self.scheduler.submit(job)
        except QueueFull as exc:
            raise RequestError(str(exc), status=429, code="rate_limit_exceeded",
                               kind="rate_limit_error") from None
        except NotRunning as exc:
            raise RequestError(str(exc), status=503, kind="server_error") from None

    def reply(self, ids: list[int], stop: list[str] | None = None) -> Reply:
        return Reply(self.tokenizer, len(ids), stop)

    def complete(self, model_id: str, ids: list[int], sampling: Sampling,
                 stop: list[str] | None = None) -> Completion:
        """Generate the whole answer (blocking; the HTTP server uses :meth:`submit`)."""
        *_, done = self.stream(model_id, ids, sampling, stop)
        return done

    def stream(self, model_id: str, ids: list[int], sampling: Sampling,
               stop: list[str] | None = None) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then the finished :class:`Completion`.
        Closing the iterator early cancels the request."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        job = self.submit(model_id, ids, sampling, events.put)
        reply = self.reply(ids, stop)
        try:
            while reply.finish is None:
                piece = reply.on(events.get())
                if piece:
                    yield piece
        finally:
            job.cancel()
        yield reply.completion()


class Reply:
    """One request's events turned into text pieces, then a :class:`Completion`."""

    def __init__(self, tokenizer, prompt_tokens: int, stop: list[str] | None = None):
        self.text = TextStream(tokenizer, stop)
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        self.finish: str | None = None

    def on(self, event: Event) -> str:
        """The new text of ``event``; sets ``finish`` when the reply is over (a stop token,
        max_tokens or a stop sequence: then the caller cancels the job). Raises the job's
        error (e.g. :class:`~peftlab.serve.scheduler.JobTimeout`)."""
        if event.error is not None:
            raise event.error
        self.tokens += len(event.tokens)
        ids = event.tokens[:-1] if event.finish == "stop" else event.tokens  # the stop token
        piece = self.text.feed(ids)
        if self.text.stopped:
            self.finish = "stop"
        elif event.finish is not None:
            piece += self.text.finish()
            self.finish = event.finish
        return piece

    def completion(self) -> Completion:
        return Completion(self.text.text, self.prompt_tokens, self.tokens, self.finish or "stop")


def public_name(spec: str | Path) -> str:
    """The model name clients see for ``spec``: an alias or hub id as given, a local path by
    its last part only (names go into every response; local paths must not)."""
    path = Path(str(spec)).expanduser()
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return str(spec)
