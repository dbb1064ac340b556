"""Continuous batching: one thread owns the model and runs every request in one loop.

Each turn of the loop runs one decode step for every running request at once (each row
with its own LoRA adapter or none, see :class:`~peftlab.methods.lora.RowAdapters`) and then
one prefill chunk of the oldest waiting request. A prompt is prefilled on its own in chunks
of at most ``prefill_chunk`` tokens, so a long prompt delays the running streams by one
chunk per step, never by its whole length; when its prefill ends the request joins the
decode batch (see :mod:`peftlab.serve.batch`) and a request that finishes leaves it at once.

Requests talk to the loop through :class:`Job`: tokens and the end arrive through the
job's ``emit`` callback (called on the loop's thread), and ``cancel()`` (a client went away,
a stop sequence matched) drops the job at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from peftlab.methods.lora import RowAdapters
from peftlab.models.growing_cache import cache_layers
from peftlab.models.kv_cache import cache_kwargs
from peftlab.runtime.packed_linear import packed_linears
from peftlab.serve.batch import DecodeBatch
from peftlab.serve.prefix_cache import PrefixCache

log = logging.getLogger("peftlab.serve")


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Event:
    """What a job hears from the loop: new token ids, then once ``finish`` (stop | length)
    or ``error`` (the job is over either way)."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: BaseException | None = None


class QueueFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class NotRunning(RuntimeError):
    """The loop is not running (not started, stopping or stopped; HTTP 503)."""


class JobTimeout(RuntimeError):
    """The job ran past its deadline and was dropped."""


@dataclass(eq=False)
class Job:
    adapter: str | None  # None: the base model
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which the job is dropped
    prefilled: int = 0
    cache: DynamicCache | None = None
    generated: int = 0
    generator: torch.Generator | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the job at the loop's next step (safe from any thread)."""
        self.cancelled = True


class Scheduler:
    """The loop over one model. ``route`` is None when the model has no LoRA adapters."""

    def __init__(self, model: nn.Module, route: RowAdapters | None, stop_ids: list[int],
                 max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 256,
                 prefix_cache: int = 32, packed_weights: bool = True):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model, self.route = model, route
        self.stops = torch.tensor(stop_ids, dtype=torch.long)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.packed_weights = packed_weights
        self.packed_layers = 0  # linear layers running packed while the loop runs
        self.prefixes = PrefixCache(prefix_cache) if prefix_cache > 0 else None
        self.device = next(model.parameters()).device
        self.batch: DecodeBatch[Job] = DecodeBatch()
        self.waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and stats)
        self.mixed_steps = 0  # ... of which served more than one model (adapters / base)
        self.max_rows_seen = 0
        self.seconds = {"decode": 0.0, "prefill": 0.0}  # time spent in each kind of step
        self.prefill_tokens = 0
        self.generated_tokens = 0

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peftlab-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step, then fail every job still waiting or running."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> Job:
        with self._wake:
            if not self.running:
                raise NotRunning("the server is not accepting requests (starting or stopping)")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
            self.waiting.append(job)
            self._wake.notify()
        return job

    def stats(self) -> dict[str, int]:
        return {"running": len(self.batch), "waiting": len(self.waiting), "steps": self.steps,
                "mixed_steps": self.mixed_steps, "max_rows_seen": self.max_rows_seen,
                "prefix_hits": self.prefixes.hits if self.prefixes else 0,
                "prefix_tokens_reused": self.prefixes.reused_tokens if self.prefixes else 0,
                "prefill_tokens": self.prefill_tokens,
                "generated_tokens": self.generated_tokens,
                "packed_layers": self.packed_layers,
                "decode_seconds": round(self.seconds["decode"], 3),
                "prefill_seconds": round(self.seconds["prefill"], 3)}

    # -- the loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        # Serving never changes a weight, so the linear layers' weights are packed once for
        # the loop's lifetime (runtime/packed_linear.py: the CPU matmul kernel's layout, at
        # the cost of the weights' size again in RAM); the model is restored when it ends.
        with packed_linears(self.model, self.packed_weights) as self.packed_layers:
            self._serve()
        self.packed_layers = 0
        self._fail_all(NotRunning("the server is stopping"))

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.batch.rows:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                with torch.no_grad():
                    self._drop_finished_jobs()
                    if self.batch.rows:
                        start = time.perf_counter()
                        self._decode_step()
                        self.seconds["decode"] += time.perf_counter() - start
                    if self.waiting and len(self.batch) < self.max_batch:
                        start = time.perf_counter()
                        self._prefill_chunk()
                        self.seconds["prefill"] += time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the server
                log.exception("scheduler step failed; failing the jobs in flight")
                self._fail_all(exc)

    def _drop_finished_jobs(self) -> None:
        now = time.monotonic()
        for job in list(self.waiting):
            if self._gone(job, now):
                self.waiting.remove(job)
        keep = [i for i, job in enumerate(self.batch.rows) if not self._gone(job, now)]
        self.batch.keep(keep)

    def _gone(self, job: Job, now: float) -> bool:
        if job.cancelled:
            return True
        if job.deadline is not None and now > job.deadline:
            job.emit(Event(error=JobTimeout("the request ran past its time limit")))
            return True
        return False

    def _prefill_chunk(self) -> None:
        job = self.waiting[0]
        if job.cache is None:
            hit = self.prefixes.lookup(job.adapter, job.prompt) if self.prefixes else None
            job.cache = DynamicCache(hit[1]) if hit else DynamicCache()
            job.prefilled = hit[0] if hit else 0
            if job.sampling.temperature > 0:
                job.generator = torch.Generator().manual_seed(
                    job.sampling.seed if job.sampling.seed is not None
                    else int(torch.randint(0, 2**62, ()).item()))
        start, end = job.prefilled, min(len(job.prompt), job.prefilled + self.prefill_chunk)
        ids = torch.tensor([job.prompt[start:end]], dtype=torch.long)
        self._route([job])
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=torch.ones(1, end, dtype=torch.long, device=self.device),
                            position_ids=torch.arange(start, end, device=self.device)[None],
                            **cache_kwargs(self.model, job.cache), use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.prefill_tokens += end - start
        job.prefilled = end
        if end < len(job.prompt):
            return
        self.waiting.popleft()
        if self.prefixes is not None:
            self.prefixes.remember(job.adapter, job.prompt, cache_layers(job.cache))
        token = self._next_tokens(logits, [job])[0]
        if self._deliver(job, token) is None:
            cache, job.cache = job.cache, None
            self.batch.join(job, cache, token)
            self.max_rows_seen = max(self.max_rows_seen, len(self.batch))

    def _decode_step(self) -> None:
        rows = self.batch.rows
        self._route(rows)
        inputs = {k: v.to(self.device) for k, v in self.batch.step_inputs().items()}
        logits = self.model(**inputs, **cache_kwargs(self.model, self.batch.cache),
                            use_cache=True).logits[:, -1]
        tokens = self._next_tokens(logits, rows)
        self.batch.last = torch.tensor(tokens, dtype=torch.long)
        self.steps += 1
        self.mixed_steps += len({job.adapter for job in rows}) > 1
        keep = [i for i, (job, token) in enumerate(zip(rows, tokens, strict=True))
                if self._deliver(job, token) is None]
        self.batch.keep(keep)

    def _route(self, jobs: list[Job]) -> None:
        if self.route is not None:
            self.route.set_rows([job.adapter for job in jobs])

    def _next_tokens(self, logits: Tensor, jobs: list[Job]) -> list[int]:
        """Greedy rows by argmax (all at once), sampled rows with their own generator."""
        tokens = logits.argmax(-1).cpu().tolist()
        for i, job in enumerate(jobs):
            if job.sampling.temperature > 0:
                tokens[i] = _sample(logits[i], job.sampling, job.generator)
        return tokens

    def _deliver(self, job: Job, token: int) -> str | None:
        """Emit ``token``; return the finish reason if the job is over (else None)."""
        job.generated += 1
        self.generated_tokens += 1
        finish = None
        if bool((self.stops == token).any()):
            finish = "stop"
        elif job.generated >= job.sampling.max_tokens:
            finish = "length"
        if job.cancelled:
            return "cancelled"
        job.emit(Event(tokens=[token], finish=finish))
        return finish

    def _fail_all(self, exc: BaseException) -> None:
        jobs = list(self.batch.rows) + list(self.waiting)
        self.batch = DecodeBatch()
        self.waiting.clear()
        for job in jobs:
            if not job.cancelled:
                job.emit(Event(error=exc))


def _sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Temperature + nucleus (top_p) sampling of one row."""
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs, order = probs.sort(descending=True)
        outside = probs.cumsum(-1) - probs >= sampling.top_p  # keeps the first token always
        probs = probs.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))
