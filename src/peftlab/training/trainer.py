"""The training loop: one readable function of plain PyTorch.

Precision, gradient accumulation, the lr schedule, evaluation, best-weight keeping,
checkpoints and resume live here and nowhere else. What a batch is and how its loss
is computed belongs to the Task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.config import ConfigError, TrainConfig, suggest
from peftlab.data.collate import length_grouped_batches
from peftlab.evaluation.loss import evaluate_loss, perplexity
from peftlab.runtime import checkpoint as ckpt
from peftlab.runtime import sharded_checkpoint as sharded_ckpt
from peftlab.runtime.cpu_attention import choices_state, cpu_attention, restore_choices
from peftlab.runtime.device import to_device
from peftlab.runtime.distributed import World
from peftlab.runtime.fast_dropout import fast_dropout
from peftlab.runtime.fast_rms_norm import fast_rms_norm
from peftlab.runtime.fsdp import (
    clip_grad_norm,
    gather_full_model,
    meta_skeleton,
    remap_param_groups,
    shard_model,
    sync_gradients,
)
from peftlab.runtime.heap import HeapTrimmer, keep_freed_memory
from peftlab.runtime.metrics_log import LogWindow, MetricsLog
from peftlab.runtime.neftune import neftune
from peftlab.runtime.optim import make_optimizer, set_lr, warmup_steps
from peftlab.runtime.precision import autocast_for
from peftlab.runtime.result import TrainResult
from peftlab.tasks.base import Task
from peftlab.training.compile import (
    AUTO_MEASURE_STEPS,
    compile_pays,
    compiled_blocks,
    resolve_compile,
    transformer_blocks,
)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``train.activation_checkpointing``: keep only each transformer block's input and
    recompute the block in backward, trading ~30% more compute for a lower peak RSS.

    Non-reentrant checkpointing lets gradients reach adapter parameters inside the blocks
    even though the frozen embeddings' output does not require grad. transformers only
    checkpoints while the model is in training mode, so evaluation is unaffected.
    """
    where = "train.activation_checkpointing"
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    legacy = getattr(model, "gradient_checkpointing_enable", None)
    if not getattr(model, "supports_gradient_checkpointing", False) or not (enable or legacy):
        raise ConfigError(f"{where}: {type(model).__name__} does not support activation "
                          "checkpointing (needs a transformers model whose class sets "
                          "supports_gradient_checkpointing); set it to false")
    kwargs = {"use_reentrant": False}
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            legacy(gradient_checkpointing_kwargs=kwargs)
    except ValueError as err:  # e.g. an architecture without checkpointable blocks
        raise ConfigError(f"{where}: {err}; set it to false") from err


@contextmanager
def cpu_training_kernels(model: nn.Module, enabled: bool = True, attention: str = "auto",
                         compiled: bool = False, norms: bool = True) -> Iterator[None]:
    """What the loop opens while it trains on a CPU: with ``train.attention: auto``, the
    attention kernel timed fastest per shape (:mod:`~peftlab.runtime.cpu_attention`; for
    compiled blocks chosen before they run) and, eager only, dropout masks from bulk random
    bits (:mod:`~peftlab.runtime.fast_dropout`; inductor makes its own random numbers) and
    RMSNorms in fewer passes (:mod:`~peftlab.runtime.fast_rms_norm`; inductor fuses them;
    ``norms=False`` keeps the model's)."""
    eager = enabled and not compiled
    with fast_dropout(model, eager), fast_rms_norm(model, eager and norms), \
            cpu_attention(model, enabled and attention == "auto", compiled=compiled):
        yield


def check_best_metric(best_metric: str, task: Task, val_examples: list[dict] | None) -> None:
    """``train.best_metric`` must be one the evaluation logs; checked before training starts,
    not at the first evaluation (after the run has begun to write)."""
    if not val_examples:
        return  # no evaluation runs: best_metric is never read
    available = ["val_loss", "val_ppl", *(f"val_{n}" for n in task.metric_names(val_examples))]
    if best_metric not in available:
        raise ConfigError(f"train.best_metric: {best_metric!r} is not computed by this task"
                          f"{suggest(best_metric, available)}; available: {', '.join(available)}")


# Called after every evaluation with (step, the logged record: step, epoch, val_*); True stops
# training at once (e.g. a sweep's pruner judging a hopeless trial).
EvalHook = Callable[[int, dict[str, Any]], bool]


class Trainer:
    """Fits ``model``'s trainable parameters on ``train_examples`` through ``task``.

    ``param_groups``: the optimizer groups of those parameters, as the method declares them
    (``methods.optimizer_param_groups``, e.g. LoRA+); default one group.
    ``on_evaluate``: an :data:`EvalHook`; when it returns True before the last step the run
    stops after that evaluation like an early stop (a step checkpoint is saved, the best
    weights restored) and ``TrainResult.stopped_by_hook`` is set; at the last step the run
    was complete anyway, so it ends as a full run.

    The model must already be on ``world.device``; batches are moved there. With
    ``train.distributed: fsdp`` and more than one rank the model is sharded here
    (peftlab.runtime.fsdp), every rank runs the same number of forward/backward passes (a rank
    short of micro-batches runs a zero-weighted one), checkpoints are sharded (DCP), and after
    :meth:`fit` ``self.model`` is a plain model with the full weights on every rank (for the
    final save and evaluation; the caller must use it, not the sharded one it passed).
    """

    def __init__(self, model: nn.Module, task: Task, train_examples: list[dict],
                 val_examples: list[dict] | None, cfg: TrainConfig, output_dir: str | Path,
                 progress: bool = True, world: World | None = None,
                 param_groups: list[dict[str, Any]] | None = None,
                 on_evaluate: EvalHook | None = None):
        if not train_examples:
            raise ValueError("no training examples left after data preparation")
        self.model, self.task, self.cfg = model, task, cfg
        self.train_examples, self.val_examples = train_examples, val_examples or []
        self.output_dir = Path(output_dir)
        self.world = world or World()
        self.on_evaluate = on_evaluate
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", writes=self.world.main)
        self.progress = progress and self.world.main
        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.params = [p for group in param_groups for p in group["params"]]
        if not self.params:
            raise ValueError("the model has no trainable parameters (did the method apply?)")
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.fsdp = cfg.distributed == "fsdp"
        self.sharded = self.fsdp and self.world.size > 1
        if self.sharded:
            names = {id(p): n for n, p in model.named_parameters()}
            self.world.broadcast(self.params)  # identical start before the weights are split
            self._skeleton = meta_skeleton(model)  # the plain model the full weights go to
            shard_model(model, self.world)
            param_groups = remap_param_groups(param_groups, names, model)
            self.params = [p for group in param_groups for p in group["params"]]
        self.optimizer = make_optimizer(param_groups, cfg)
        self.lengths = [task.length(e) for e in train_examples]
        self.batches_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
        # one optimizer step consumes grad_accum micro-batches on every rank
        self.micro_per_step = cfg.grad_accum * self.world.size
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / self.micro_per_step))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        tokens_per_step = sum(self.lengths) / len(self.lengths) * cfg.batch_size * cfg.grad_accum
        compiled, self.compile_reason = resolve_compile(cfg, model, self.total_steps,
                                                        tokens_per_step)
        # auto with nothing against it: fit times AUTO_MEASURE_STEPS eager steps, then decides
        self.compile_pending = compiled is None
        self.compiled = bool(compiled)
        self.compile_horizon = self.total_steps  # the run length that decision assumes
        self.compiled_from_step: int | None = 0 if self.compiled else None
        if self.compiled or self.compile_pending:
            transformer_blocks(model)  # a model without findable blocks fails here, not in fit
        self.warmup_steps = warmup_steps(cfg, self.total_steps)
        self.save_every = cfg.save_every or cfg.eval_every or self.steps_per_epoch
        self.heap: HeapTrimmer | None = None  # set by fit when it keeps freed memory

    # -- the loop -------------------------------------------------------------------
    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        cfg, world = self.cfg, self.world
        if world.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + world.rank)  # dropout: different masks on each rank
        self.heap = None
        if world.device.type == "cpu" and cfg.keep_freed_memory and keep_freed_memory():
            # no page faults on every step's activation buffers, and what is kept stays
            # bounded (compiled steps fragment the heap)
            self.heap = HeapTrimmer()
        state = {"step": 0, "micro": 0, "best_value": None, "best_step": None, "tokens": 0,
                 "bad_evals": 0, "window": [0.0, 0]}
        if resume:
            path = ckpt.latest_checkpoint(self.ckpt_dir) if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.ckpt_dir}")
            loaded = self._load(Path(path), self.optimizer)
            state.update({k: loaded[k] for k in state if k in loaded})
            restore_choices(loaded.get("attention_kernels", []))  # the first part's kernels
            self.metrics.trim(state["step"])
            if world.main:
                print(f"resumed from {path} at step {state['step']}")
        else:
            self.metrics.start()
        if not self.sharded:  # identical start on every rank, whatever each loaded
            world.broadcast(self.params)

        self.model.train()
        step, micro = state["step"], state["micro"]
        history: list[dict[str, Any]] = []
        last_loss = None
        bar = tqdm(total=self.total_steps, initial=step, disable=not self.progress,
                   desc="train", unit="step", mininterval=1.0, dynamic_ncols=True)
        t0 = time.perf_counter()
        window = LogWindow()  # a resumed run logs the same means as a straight one
        window.loss_sum, window.steps = state["window"]
        stopped_by_hook = False
        # the bar is closed before any error line is printed; NEFTune's hook is removed
        kernels = ExitStack()  # reopened compiled when auto decides to compile mid-run
        with neftune(self.model, cfg.neftune_alpha), kernels, bar:
            self._open_kernels(kernels)
            steps_here, last_step_seconds = 0, 0.0
            for group in self._step_groups(micro):
                if step >= self.total_steps:
                    break
                if self.compile_pending and steps_here == AUTO_MEASURE_STEPS:
                    self._decide_compile(kernels, step, last_step_seconds, bar)
                step_start = time.perf_counter()
                step_tokens = 0
                lr = set_lr(self.optimizer, cfg, step, self.total_steps, self.warmup_steps)
                mine = world.shard(group)  # this rank's share of the step
                batches = [self.task.collate([self.train_examples[i] for i in idx]) for idx in mine]
                if self.compile_pending:  # timed eager steps: half the rows at a time, so
                    # eager activations do not set a peak the compiled steps never reach
                    batches = [part for b in batches for part in self.task.split_rows(b)]
                n_total = int(world.sum([sum(self.task.count(b) for b in batches)])[0])
                weights = [1.0] * len(batches)
                if self.sharded:  # FSDP's collectives need the same passes on every rank
                    short = math.ceil(len(group) / world.size) - len(batches)
                    batches += [self.task.collate([self.train_examples[i] for i in group[0]])] * short
                    weights += [0.0] * short
                loss_total = 0.0
                for batch, weight in zip(batches, weights, strict=True):
                    batch = to_device(batch, world.device)
                    with autocast_for(cfg.precision):
                        loss_sum, _n = self.task.loss(self.model, batch)
                    (loss_sum * (weight / max(n_total, 1))).backward()
                    loss_total += weight * float(loss_sum.detach())
                    if "attention_mask" in batch and weight:
                        step_tokens += int(batch["attention_mask"].sum())
                if self.sharded:
                    loss_total, step_tokens = sync_gradients(self.params, world,
                                                             [loss_total, step_tokens])
                    step_tokens = int(step_tokens)
                elif world.size > 1:
                    loss_total, step_tokens = world.sum_gradients(self.params,
                                                                  [loss_total, step_tokens])
                    step_tokens = int(step_tokens)
                grad_norm = None
                if cfg.max_grad_norm and self.sharded:
                    grad_norm = clip_grad_norm(self.params, cfg.max_grad_norm)
                elif cfg.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.heap is not None:
                    self.heap.after_step()
                step += 1
                micro += len(group)
                last_loss = loss_total / max(n_total, 1)
                state["tokens"] += step_tokens
                last_step_seconds = time.perf_counter() - step_start
                steps_here += 1
                window.add(last_loss, step_tokens, last_step_seconds)
                bar.update(1)
                bar.set_postfix(loss=f"{window.mean_loss:.4f}", tok_s=f"{window.tokens_per_s:.0f}",
                                lr=f"{lr:.2e}")
                if step % cfg.log_every == 0 or step == 1 or step == self.total_steps:
                    # loss and tokens/s: means over the steps since the last record
                    rec = {"step": step, "epoch": round(micro / self.batches_per_epoch, 3),
                           "loss": round(window.mean_loss, 5), "step_loss": round(last_loss, 5),
                           "lr": lr, "tokens_per_s": round(window.tokens_per_s, 1)}
                    if grad_norm is not None:
                        rec["grad_norm"] = round(grad_norm, 4)
                    self.metrics.append(rec, history)
                    window.reset()
                state["window"] = [window.loss_sum, window.steps]

                end_of_epoch = micro % self.batches_per_epoch == 0
                do_eval = self.val_examples and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or end_of_epoch
                    or step == self.total_steps)
                stop_early = False
                if do_eval:
                    rec = {"step": step, "epoch": round(micro / self.batches_per_epoch, 3),
                           **self.evaluate()}
                    self.metrics.append(rec, history)
                    bar.write(f"step {step}: " + "  ".join(
                        f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("val_")))
                    value = rec.get(self.best_metric)
                    if value is None:
                        raise ValueError(f"train.best_metric: {self.best_metric!r} is not computed by "
                                         f"this task (available: {sorted(rec)})")
                    if state["best_value"] is None or self._better(value, state["best_value"]):
                        state["best_value"], state["best_step"] = value, step
                        state["bad_evals"] = 0
                        self._save(self.ckpt_dir / "best", dict(state, step=step, micro=micro))
                    else:
                        state["bad_evals"] += 1
                        patience = cfg.early_stopping_patience
                        stop_early = patience is not None and state["bad_evals"] >= patience
                    # the hook sees every evaluation; a stop at the last step stops nothing
                    if (self.on_evaluate is not None and self.on_evaluate(step, rec)
                            and step < self.total_steps):
                        stopped_by_hook = True
                if step % self.save_every == 0 or step == self.total_steps:
                    self._save_step(dict(state, step=step, micro=micro))
                if stop_early:
                    bar.write(f"early stopping at step {step}: {self.best_metric} has not improved "
                              f"for {state['bad_evals']} evaluations")
                    self._save_step(dict(state, step=step, micro=micro))
                    break
                if stopped_by_hook:
                    bar.write(f"stopped at step {step} by the on_evaluate hook")
                    if step % self.save_every and step != self.total_steps:
                        self._save_step(dict(state, step=step, micro=micro))
                    break
        seconds = time.perf_counter() - t0
        best_dir = self.ckpt_dir / "best"
        if (state["best_step"] is not None and state["best_step"] != step and best_dir.exists()
                and (world.main or self.sharded)):  # ddp: other ranks' weights are not saved
            self._load(best_dir)
            if world.main:
                print(f"restored best weights from step {state['best_step']} "
                      f"({self.best_metric} {state['best_value']:.4f})")
        if self.sharded:  # rank 0 saves and evaluates the full model alone from here on
            self.model = gather_full_model(self.model, self._skeleton)
        self.model.eval()
        return TrainResult(steps=step, final_train_loss=last_loss,
                           best_value=state["best_value"], best_step=state["best_step"],
                           best_metric=self.best_metric,
                           history=history, seconds=seconds, tokens=state["tokens"],
                           stopped_by_hook=stopped_by_hook)

    def _open_kernels(self, kernels: ExitStack) -> None:
        on_cpu = self.world.device.type == "cpu"
        # fsdp: sharded norm weights are never swapped, so one-process fsdp runs keep the
        # model's norms too and 1 and N processes compute alike (tests/test_fsdp.py)
        kernels.enter_context(cpu_training_kernels(self.model, on_cpu, self.cfg.attention,
                                                   self.compiled, norms=not self.fsdp))
        kernels.enter_context(compiled_blocks(self.model, self.compiled))

    def _decide_compile(self, kernels: ExitStack, step: int, eager_step_seconds: float,
                        bar: tqdm) -> None:
        """``compile: auto``'s timed half: compile the blocks from this step on if the rest
        of the run at the measured eager pace repays it."""
        self.compile_pending = False
        remaining = self.compile_horizon - step
        self.compiled, why = compile_pays(eager_step_seconds, remaining)
        # every rank takes rank 0's decision: DDP ranks must run the same kind of step
        self.compiled = self.world.sum([float(self.compiled and self.world.main)])[0] > 0
        self.compile_reason = why if self.world.size == 1 else f"{why} (rank 0's timing)"
        if self.compiled:
            kernels.close()
            self._open_kernels(kernels)
            self.compiled_from_step = step
        if self.world.main:
            bar.write(f"compile auto -> {self.compile_reason}")

    # -- evaluation -----------------------------------------------------------------
    @property
    def best_metric(self) -> str:
        return self.cfg.best_metric

    def _better(self, value: float, best: float) -> bool:
        # per-source metrics of a data.mixture are named e.g. val_loss/<source>
        lower_is_better = self.best_metric.split("/")[0].endswith(("loss", "ppl"))
        return value < best if lower_is_better else value > best

    def evaluate(self) -> dict[str, float]:
        """Validation loss (+ perplexity) and whatever metrics the task computes."""
        cfg = self.cfg
        both = (self.task.validate(self.model, self.val_examples, cfg.batch_size, cfg.precision)
                if self.world.size == 1 else None)  # ranks share the loss pass instead
        if both is None:
            val = evaluate_loss(self.model, self.task, self.val_examples, cfg.batch_size,
                                cfg.precision, world=self.world, lockstep=self.sharded)
            extra = self.task.metrics(self.model, self.val_examples, cfg.batch_size,
                                      cfg.precision)
        else:
            val, extra = both
        out = {"val_loss": round(val, 5), "val_ppl": round(perplexity(val), 3)}
        out.update({f"val_{k}": v for k, v in extra.items()})
        return out

    # -- helpers --------------------------------------------------------------------
    def _step_groups(self, start_micro: int) -> Iterator[list[list[int]]]:
        """Micro-batches grouped per optimizer step, resuming after ``start_micro``."""
        epoch = start_micro // self.batches_per_epoch
        skip = start_micro % self.batches_per_epoch
        while True:
            batches = length_grouped_batches(self.lengths, self.cfg.batch_size,
                                             self.cfg.seed, epoch)[skip:]
            for i in range(0, len(batches), self.micro_per_step):
                yield batches[i:i + self.micro_per_step]
            epoch, skip = epoch + 1, 0

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        state = dict(state, attention_kernels=choices_state())
        if self.fsdp:  # every rank writes its shards (also in one process: any size resumes)
            sharded_ckpt.save_sharded(path, self.model, self.optimizer, state, self.world)
        elif self.world.main:  # every rank holds the same weights and optimizer state
            ckpt.save_checkpoint(path, self.model, self.optimizer, state)

    def _save_step(self, state: dict[str, Any]) -> None:
        state = dict(state, attention_kernels=choices_state())
        if self.fsdp:
            sharded_ckpt.save_step_sharded(self.ckpt_dir, state["step"], self.model,
                                           self.optimizer, state, self.world)
        elif self.world.main:
            ckpt.save_step(self.ckpt_dir, state["step"], self.model, self.optimizer, state)

    def _load(self, path: Path, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """A checkpoint of this run's format (sharded DCP for fsdp, safetensors for ddp)."""
        if sharded_ckpt.is_sharded_checkpoint(path) != self.fsdp:
            written = "ddp" if self.fsdp else "fsdp"
            raise ConfigError(f"--resume: {path} was written with train.distributed: {written}; "
                              f"this run has train.distributed: {self.cfg.distributed}")
        if self.fsdp:
            return sharded_ckpt.load_sharded(path, self.model, optimizer)
        return ckpt.load_checkpoint(path, self.model, optimizer)
