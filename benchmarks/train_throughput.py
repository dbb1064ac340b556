"""Training throughput: peftlab vs transformers + peft, on the same machine, in the same run.

Both sides train the same model (SmolLM2-135M-Instruct) with the same LoRA (identical initial
weights, saved once by peft and loaded by both), the same optimiser and the very same batches
(built once from real Alpaca data, saved to a temp safetensors file, fed in the same order).

* candidate ``peftlab``: peftlab's defaults — ``Trainer`` + ``SFTTask`` (label-only LM head),
  our LoRA, precision ``auto`` resolved in the worker (``resolve_precision`` +
  ``prepare_precision``).
* ``ref_bf16``: transformers + peft, plain loop ``model(ids, mask, labels).loss.backward()``
  under ``torch.autocast("cpu", torch.bfloat16)`` with fp32 weights (the usual user setup).
* ``ref_bf16_compile``: the bf16 loop with ``torch.compile(model)`` (the whole PeftModel,
  inductor): the peer a performance-minded user runs. Its first step is the compile, reported
  separately (``first_step_seconds``).
* ``ref_fp32``: the same loop in fp32.
* ``ref_fp32_compile``: the fp32 loop under ``torch.compile(model)``, run only where the bf16
  peers cannot run: on a CPU without bf16 instructions (an AVX2-only EPYC) oneDNN has no bf16
  kernel and a bf16 matmul runs ~100x slower than fp32, so one bf16-autocast step would take
  tens of minutes; there fp32 is what a user runs and the compiled fp32 loop is the strong
  peer (``skipped_peers`` in the JSON says why the bf16 rows are missing).

Every worker shares one fresh inductor cache (``TORCHINDUCTOR_CACHE_DIR`` in the run's temp
dir): round 1 compiles cold, later rounds show what a warm on-disk cache costs.

Every configuration runs in its own subprocess (``--worker``), alternating candidate and
references for ``--repeats`` rounds, so each worker's peak RSS is its own and slow drifts of a
shared machine hit all sides alike. Extra sections (skippable): end-to-end wall time,
classification training (MiniLM on SST-2) and KV-cache generation.

    python benchmarks/train_throughput.py --quick      # < 5 min, same fields
    python benchmarks/train_throughput.py              # the full run
    python benchmarks/train_throughput.py --profile peftlab   # torch.profiler, top ops
    python benchmarks/train_throughput.py --only-cls   # the classification section alone
                                                       # (train_throughput_cls.{json,md})
    python benchmarks/train_throughput.py --only-gen   # the generation section alone
                                                       # (train_throughput_gen.{json,md})
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_5000.jsonl"
SST2 = SHARED_DATA / "sst2" / "train.tsv"
RESULTS = REPO / "benchmarks" / "results"

MODEL = "smollm2-135m-instruct"
CLS_MODEL = "minilm-l6"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CANDIDATE, REF_BF16, REF_FP32 = "peftlab", "ref_bf16", "ref_fp32"
REF_BF16_COMPILE = "ref_bf16_compile"  # the bf16 peer under torch.compile(model)
REF_FP32_COMPILE = "ref_fp32_compile"  # the fp32 peer compiled, where bf16 cannot run
BF16_PEERS = (REF_BF16, REF_BF16_COMPILE)
CANDIDATE_CKPT = "peftlab_ckpt"  # peftlab defaults + train.activation_checkpointing (opt-in)
CONFIGS = (CANDIDATE, REF_BF16, REF_FP32)  # also the alternation order within a round
# the SFT section also measures the compiled peer and peftlab's opt-in memory lever
TRAIN_CONFIGS = (CANDIDATE, REF_BF16, REF_BF16_COMPILE, REF_FP32, CANDIDATE_CKPT)
E2E_CONFIGS = (CANDIDATE, REF_BF16, REF_BF16_COMPILE)
# where bf16 cannot run (see skipped_peers): the fp32 peers, eager and compiled
FP32_TRAIN_CONFIGS = (CANDIDATE, REF_FP32_COMPILE, REF_FP32, CANDIDATE_CKPT)
FP32_E2E_CONFIGS = (CANDIDATE, REF_FP32, REF_FP32_COMPILE)
BF16_RUNNABLE = 0.25  # bf16 matmuls below this share of fp32's speed: no bf16 kernel here
AUTO_COMPILE_STEPS = 50  # train.compile: auto decides as for a run this long (the e2e run)
IGNORE = -100
WARMUP_STEPS = 2  # skipped when taking the steady-state median

# name -> (target, higher_is_better)
TARGETS = {
    "train_vs_bf16": (2.0, True),
    "train_vs_bf16_compile": (1.2, True),
    # where bf16 cannot run, the same goals against the fp32 peers (what a user runs there)
    "train_vs_fp32": (2.0, True),
    "train_vs_fp32_compile": (1.2, True),
    "e2e_vs_fp32": (0.6, False),
    "e2e_vs_fp32_compile": (0.8, False),
    "loss_vs_fp32": (0.01, False),
    "mfu": (0.55, True),  # bf16-fast CPU; 0.70 where fp32 is the faster precision (mfu_target)
    "e2e_vs_bf16": (0.6, False),
    "e2e_vs_bf16_compile": (0.8, False),
    "rss_vs_fp32": (0.6, False),
    "cls_vs_best": (1.5, True),
    "gen_b1": (1.0, True),
    "gen_b8": (1.2, True),
    "gen_b8_vs_fp32": (1.2, True),  # transformers as a user loads it (fp32 weights)
}
MFU_TARGET = {"bf16": 0.55, "fp32": 0.70}  # by the precision with the higher measured peak


# ================================================================== data (built once, in the parent)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"error: {what} not found at {path} (expected the shared datasets in "
                         f"<repo>/../shared/data; see benchmarks/README.md)")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"error: {path}:{i}: not valid JSON ({exc.msg})") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def build_sft_batches(tokenizer, records: list[dict[str, Any]], n_batches: int, batch_size: int,
                      seq_len: int, source: str = "data") -> dict[str, torch.Tensor]:
    """Pack whole chat-templated conversations (completion-only labels) into fixed rows.

    First-fit packing into ``n_batches * batch_size`` rows of ``seq_len`` tokens; the unused
    tail of a row is padding (attention 0, label -100). Conversations longer than a row are
    skipped, never cut. Returns ``input_ids``/``attention_mask``/``labels`` shaped
    (n_batches, batch_size, seq_len).
    """
    from peftlab.config import DataConfig
    from peftlab.data.sft import record_to_messages, tokenize_conversation

    cfg = DataConfig()
    n_rows = n_batches * batch_size
    rows: list[tuple[list[int], list[int]]] = []
    misses = 0
    for i, record in enumerate(records):
        messages = record_to_messages(record, cfg, f"{source}:{i + 1}")
        ex = tokenize_conversation(messages, tokenizer)
        ids, labels = ex["input_ids"], ex["labels"]
        if len(ids) > seq_len or all(t == IGNORE for t in labels[1:]):
            continue
        row = next((r for r in rows if len(r[0]) + len(ids) <= seq_len), None)
        if row is None and len(rows) < n_rows:
            row = ([], [])
            rows.append(row)
        if row is None:
            misses += 1
            if misses > 200:  # every row is (nearly) full
                break
            continue
        row[0].extend(ids)
        row[1].extend(labels)
    if len(rows) < n_rows:
        raise SystemExit(f"error: {source}: only enough conversations for {len(rows)} rows of "
                         f"{seq_len} tokens, need {n_rows}")
    pad = tokenizer.pad_token_id
    input_ids = torch.full((n_rows, seq_len), pad, dtype=torch.long)
    labels = torch.full((n_rows, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n_rows, seq_len), dtype=torch.long)
    for r, (ids, labs) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(labs)] = torch.tensor(labs)
        mask[r, :len(ids)] = 1
    shape = (n_batches, batch_size, seq_len)
    return {"input_ids": input_ids.view(shape), "attention_mask": mask.view(shape),
            "labels": labels.view(shape)}


def build_cls_batches(tokenizer, path: Path, n_batches: int, batch_size: int,
                      seq_len: int, by_length: bool = False) -> dict[str, torch.Tensor]:
    """SST-2 sentences, truncated/padded to ``seq_len``, in file order, or with ``by_length``
    sorted by token count first (each batch holds sentences of similar length, as a
    length-grouping sampler makes them)."""
    need = n_batches * batch_size
    texts, labels = [], []
    with path.open() as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:2] != ["sentence", "label"]:
            raise SystemExit(f"error: {path}:1: expected header 'sentence<TAB>label', got {header}")
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or parts[1] not in ("0", "1"):
                raise SystemExit(f"error: {path}:{lineno}: expected 'sentence<TAB>0|1'")
            texts.append(parts[0])
            labels.append(int(parts[1]))
            if len(texts) >= need:
                break
    if len(texts) < need:
        raise SystemExit(f"error: {path}: {len(texts)} rows, need {need}")
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True,
                                                 max_length=seq_len)["input_ids"]]
        order = sorted(range(need), key=lambda i: lengths[i])
        texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length",
                    return_tensors="pt")
    out = {k: enc[k].view(n_batches, batch_size, seq_len)
           for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.tensor(labels).view(n_batches, batch_size)
    return out


def make_init_adapter(model_spec: str, directory: Path, seed: int, kind: str = "causal_lm",
                      r: int = 16, alpha: float = 32, targets: list[str] | None = None) -> None:
    """Save peft's LoRA init (A kaiming-uniform from ``seed``, B = 0) for both sides to load."""
    from peft import LoraConfig, get_peft_model

    from peftlab.models import load_model

    torch.manual_seed(seed)
    if kind == "causal_lm":
        model, _ = load_model(model_spec)
        task_type = "CAUSAL_LM"
    else:
        model, _ = load_model(model_spec, kind="sequence_classification", num_labels=2)
        task_type = "SEQ_CLS"  # peft adds the new classifier head to modules_to_save
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or LORA_TARGETS,
                     bias="none", task_type=task_type)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(directory))
    del model, peft_model
    gc.collect()


def flop_params(model_spec: str) -> int:
    """N for MFU: parameters of the transformer blocks (+ final norm), without the token
    embedding / LM-head matrix (tied in SmolLM2). Counted on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftlab.models import resolve_spec

    config = AutoConfig.from_pretrained(resolve_spec(model_spec))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ================================================================== workers (one per subprocess)


def step_clock(cfg: dict[str, Any]) -> Callable[[], float]:
    """The clock steps are timed with: wall time, or (``--clock cpu``, one thread per worker)
    the process's CPU time, which other jobs on a shared machine barely disturb."""
    return time.process_time if cfg.get("clock") == "cpu" else time.perf_counter


class FixedBatchTask:
    """Hands the Trainer the pre-built batches in order and records each step's exact loss.

    Everything else (loss maths, counting) is the wrapped peftlab task's.
    """

    def __init__(self, inner, batches: dict[str, torch.Tensor],
                 clock: Callable[[], float] = time.perf_counter):
        self.inner, self.batches, self.clock = inner, batches, clock
        self.n = batches["input_ids"].shape[0]
        self.calls = 0
        self.sums: list[float] = []  # per step: the loss summed over its (split) batches
        self.counts: list[int] = []
        self.starts: list[float] = []  # clock() when the Trainer asked for each batch

    def length(self, example: dict[str, Any]) -> int:
        return 1

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.starts.append(self.clock())
        self.sums.append(0.0)
        self.counts.append(0)
        t = self.calls % self.n
        self.calls += 1
        return {k: v[t] for k, v in self.batches.items()}

    def count(self, batch: dict[str, Any]) -> int:
        return self.inner.count(batch)

    def split_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return self.inner.split_rows(batch)

    def loss(self, model, batch):
        loss_sum, n = self.inner.loss(model, batch)
        self.sums[-1] += float(loss_sum.detach())
        self.counts[-1] += n
        return loss_sum, n

    @property
    def losses(self) -> list[float]:
        """Each step's mean loss over its labelled tokens (as the references report it)."""
        return [s / max(n, 1) for s, n in zip(self.sums, self.counts, strict=True)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def _maybe_profile(enabled: bool, rows: int = 25):
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        yield
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _since_spawn(cfg: dict[str, Any]) -> float:
    return time.time() - cfg.get("spawn_time", time.time())


def train_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg["name"]`` for ``cfg["steps"]`` steps on the fixed batches; report timings.

    cfg: name (peftlab | ref_bf16 | ref_fp32), model, batches (safetensors path), adapter (init
    adapter dir), steps, lr, seed, out_dir, precision (candidate only; "auto" by default),
    spawn_time (parent's time.time() at spawn, for the end-to-end wall), profile.
    """
    batches = load_file(cfg["batches"])
    name = cfg["name"]
    out = {"name": name}
    runner = _train_peftlab if name in (CANDIDATE, CANDIDATE_CKPT) else _train_reference
    out.update(runner(cfg, batches))
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    out["matmul_gflops"] = best_matmul_gflops(2)  # after the timed part: no startup cost
    return out


def best_matmul_gflops(trials: int) -> dict[str, float]:
    """Best of ``trials`` runs of peftlab's own measurement (``measured_matmul_gflops``, uncached:
    one run is only 8 matmuls per dtype, easily disturbed on a shared machine)."""
    from peftlab.runtime.precision import measured_matmul_gflops

    runs = [measured_matmul_gflops.__wrapped__() for _ in range(trials)]
    return {d: max(r[d] for r in runs) for d in ("fp32", "bf16")}


def _train_peftlab(cfg: dict[str, Any], batches: dict[str, torch.Tensor]) -> dict[str, Any]:
    from peftlab.config import TrainConfig
    from peftlab.methods.lora import load_lora, save_lora
    from peftlab.models import load_model
    from peftlab.runtime.precision import prepare_precision, resolve_precision
    from peftlab.tasks.sft.task import SFTTask
    from peftlab.training.compile import resolve_compile
    from peftlab.training.trainer import Trainer

    precision = resolve_precision(cfg.get("precision", "auto"))
    model, tokenizer = load_model(cfg["model"])
    load_lora(model, cfg["adapter"])
    prepare_precision(model, precision)
    clock = step_clock(cfg)
    task = FixedBatchTask(SFTTask(pad_id=tokenizer.pad_token_id), batches, clock)
    steps = cfg["steps"]
    tcfg = TrainConfig(max_steps=steps, batch_size=1, grad_accum=1, lr=cfg["lr"],
                       weight_decay=0.0, scheduler="constant", warmup_steps=0, max_grad_norm=None,
                       precision=precision, log_every=1, save_every=steps, seed=cfg["seed"],
                       activation_checkpointing=cfg["name"] == CANDIDATE_CKPT,
                       compile=cfg.get("compile", "auto"),  # train_levers.py sets these two
                       attention=cfg.get("attention", "auto"))
    # compile: auto decides as for a real run, not a 12-step probe: the up-front checks for
    # that length, then (when they pass) the Trainer times eager steps as in a real run
    horizon = max(steps, AUTO_COMPILE_STEPS)
    decision = tcfg.compile
    if decision == "auto":
        decision, _ = resolve_compile(tcfg, model, horizon,
                                      float(batches["attention_mask"][0].sum()))
        tcfg.compile = bool(decision)
    out_dir = Path(cfg["out_dir"])
    trainer = Trainer(model, task, [{"index": i} for i in range(steps)], None, tcfg, out_dir,
                      progress=False)
    if decision is None:
        trainer.compile_pending, trainer.compile_horizon = True, horizon
    ends: list[float] = []  # a step = batch request -> optimizer.step() done, as for the refs
    trainer.optimizer.register_step_post_hook(lambda *_: ends.append(clock()))
    startup = _since_spawn(cfg)
    with _maybe_profile(cfg.get("profile", False)):
        trainer.fit()
    save_lora(model, out_dir / "adapter")
    wall = _since_spawn(cfg)
    tokens = [int(batches["attention_mask"][t % task.n].sum()) for t in range(steps)]
    seconds = [end - start for start, end in zip(task.starts, ends, strict=True)]
    return {"precision": precision, "compiled": trainer.compiled,
            "compiled_from_step": trainer.compiled_from_step, "losses": task.losses,
            "heap_trims": trainer.heap.trims if trainer.heap is not None else 0,
            "step_seconds": seconds, "step_tokens": tokens, "startup_seconds": startup,
            "wall_seconds": wall}


def _train_reference(cfg: dict[str, Any], batches: dict[str, torch.Tensor]) -> dict[str, Any]:
    from peft import PeftModel

    from peftlab.models import load_model

    bf16 = cfg["name"] in BF16_PEERS
    compiled = cfg["name"] in (REF_BF16_COMPILE, REF_FP32_COMPILE)
    model, _ = load_model(cfg["model"])
    model = PeftModel.from_pretrained(model, cfg["adapter"], is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compiled else model  # same parameters, compiled calls
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    torch.manual_seed(cfg["seed"])
    model.train()
    n = batches["input_ids"].shape[0]
    losses, seconds, tokens = [], [], []
    clock = step_clock(cfg)
    startup = _since_spawn(cfg)
    with _maybe_profile(cfg.get("profile", False)):
        for t in range(cfg["steps"]):
            start = clock()
            ids, mask, labels = (batches[k][t % n] for k in ("input_ids", "attention_mask", "labels"))
            with _autocast(bf16):
                loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            seconds.append(clock() - start)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens.append(int(mask.sum()))
    model.save_pretrained(str(Path(cfg["out_dir"]) / "adapter"))
    wall = _since_spawn(cfg)
    return {"precision": "bf16-autocast" if bf16 else "fp32", "compiled": compiled,
            "losses": losses, "step_seconds": seconds, "step_tokens": tokens,
            "startup_seconds": startup, "wall_seconds": wall}


def cls_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Classification training: MiniLM + LoRA(query, value) + trainable classifier."""
    from peftlab.models import load_model

    batches = load_file(cfg["batches"])
    name = cfg["name"]
    torch.manual_seed(cfg["seed"])  # weights the checkpoint lacks (if any) init identically
    model, tokenizer = load_model(cfg["model"], kind="sequence_classification", num_labels=2)
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batches]
    if name == CANDIDATE:
        from peftlab.methods.lora import load_lora
        from peftlab.runtime.heap import keep_freed_memory
        from peftlab.runtime.precision import autocast_for, prepare_precision, resolve_precision
        from peftlab.tasks.classification.task import ClassificationTask

        keep_freed_memory()  # as the Trainer does when it trains on a CPU
        precision = resolve_precision(cfg.get("precision", "auto"))
        load_lora(model, cfg["adapter"])
        prepare_precision(model, precision)
        task = ClassificationTask({"labels": ["0", "1"]}, pad_id=tokenizer.pad_token_id)

        def step_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast_for(precision):
                loss_sum, n = task.loss(model, batch)
            return loss_sum / n
    else:
        from peft import PeftModel

        precision = "bf16-autocast" if name == REF_BF16 else "fp32"
        model = PeftModel.from_pretrained(model, cfg["adapter"], is_trainable=True)

        def step_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with _autocast(name == REF_BF16):
                return model(**{k: batch[k] for k in inputs}, labels=batch["labels"]).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    torch.manual_seed(cfg["seed"])  # BERT has dropout: same masks on both peers
    model.train()
    n = batches["input_ids"].shape[0]
    losses, seconds, tokens = [], [], []
    clock = step_clock(cfg)
    # what peftlab's Trainer opens while it trains eager on a CPU
    from peftlab.training.trainer import cpu_training_kernels

    with cpu_training_kernels(model, enabled=name == CANDIDATE):
        for t in range(cfg["steps"]):
            start = clock()
            batch = {k: v[t % n] for k, v in batches.items()}
            if cfg["padding"] == "longest":  # as DataCollatorWithPadding and peftlab collate
                width = int(batch["attention_mask"].sum(dim=1).max())
                batch = {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}
            loss = step_loss(batch)
            loss.backward()
            optimizer.step()
            seconds.append(clock() - start)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens.append(batch["input_ids"].numel())  # padded positions: the peer computes all
    return {"name": name, "precision": precision, "losses": losses, "step_seconds": seconds,
            "step_tokens": tokens, "examples_per_step": batches["labels"].shape[1],
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def gen_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Greedy KV-cache generation with a merged LoRA model, batch 1 and batch 8."""
    from peftlab.models import load_model

    name, max_new = cfg["name"], cfg["max_new_tokens"]
    convs = cfg["conversations"]
    # the bf16 peer: transformers' own way, from_pretrained(dtype=torch.bfloat16)
    model, tokenizer = load_model(cfg["model"],
                                  dtype=torch.bfloat16 if name == "ref_bf16" else torch.float32)
    precision = "bf16" if name == "ref_bf16" else "fp32"
    if name == CANDIDATE:
        from peftlab.data.sft import encode_prompt
        from peftlab.evaluation.generate import generate_tokens
        from peftlab.methods.lora import load_lora, merge_and_unload
        from peftlab.runtime.precision import prepare_inference

        load_lora(model, cfg["adapter"])
        merge_and_unload(model)
        precision = prepare_inference(model, "auto")  # as `peftlab serve` / `chat` do
        model.eval()

        def run(batch: list[list[dict]], batch_size: int,
                new_tokens: int = max_new) -> tuple[list[str], list[int]]:
            # generate_replies' steps, with the token counts kept (rows end at a stop token)
            rows = generate_tokens(model, tokenizer, [encode_prompt(c, tokenizer) for c in batch],
                                   max_new_tokens=new_tokens, batch_size=batch_size)
            return ([tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows],
                    [len(r) for r in rows])
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg["adapter"]).merge_and_unload()
        model.eval()
        tokenizer.padding_side = "left"

        def run(batch: list[list[dict]], batch_size: int,
                new_tokens: int = max_new) -> tuple[list[str], list[int]]:
            replies, counts = [], []
            for i in range(0, len(batch), batch_size):
                enc = tokenizer.apply_chat_template(batch[i:i + batch_size],
                                                    add_generation_prompt=True, padding=True,
                                                    return_tensors="pt", return_dict=True)
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None)
                new = out[:, enc["input_ids"].shape[1]:]
                for row in new:
                    counts.append(_generated_length(row.tolist(), model.generation_config))
                    replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            return replies, counts
    run(convs[:1], 1, new_tokens=8)  # warm-up (first-call allocations, kernel selection)
    out: dict[str, Any] = {"name": name, "precision": precision}
    for label, batch, batch_size in (("b1", convs[:cfg["b1_prompts"]], 1), ("b8", convs[:8], 8)):
        clock = step_clock(cfg)
        start = clock()
        replies, counts = run(batch, batch_size)
        out[label] = {"seconds": clock() - start, "replies": replies,
                      "new_tokens": counts}
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def _generated_length(row: list[int], gen_config) -> int:
    """New tokens up to and including the first stop token (the rest is padding)."""
    stops = gen_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    for i, tok in enumerate(row):
        if tok in stops:
            return i + 1
    return len(row)


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": train_worker, "cls": cls_worker, "gen": gen_worker}


# ================================================================== orchestration (the parent)


def spawn(kind: str, cfg: dict[str, Any], tmp: Path, tag: str, threads: int | None = None,
          script: Path | None = None, check: bool = True) -> dict[str, Any]:
    """Run one worker (``script --worker kind``, default this file) in a fresh interpreter;
    return its JSON result. ``check=False``: a worker that failed (e.g. killed for memory)
    gives ``{"failed": True, "returncode": ..., "log_tail": ...}`` instead of ending the run."""
    cfg = dict(cfg, out_dir=str(tmp / f"out-{tag}"), threads=threads, spawn_time=time.time())
    cfg_path, res_path, log_path = (tmp / f"{tag}.{ext}" for ext in ("cfg.json", "res.json", "log"))
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor-cache"))  # cold in round 1 only
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(script or __file__), "--worker", kind,
                               "--worker-config",
                               str(cfg_path), "--worker-result", str(res_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        if not check:
            return {"failed": True, "returncode": proc.returncode, "log_tail": tail}
        raise SystemExit(f"error: worker {tag} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(res_path.read_text())


def run_worker(args, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The worker side of :func:`spawn`: read its config, set its threads, write its result."""
    cfg = json.loads(args.worker_config.read_text())
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    args.worker_result.write_text(json.dumps(fn(cfg)))


def steady_rates(runs: list[dict[str, Any]], skip: int) -> list[float]:
    """tokens/s of every step after the first ``skip`` of each run, pooled; a run whose blocks
    compiled mid-run (``compile: auto`` after timing eager steps) also skips its compile step."""
    return [n / s for run in runs
            for n, s in list(zip(run["step_tokens"], run["step_seconds"], strict=True))[
                max(skip, (run.get("compiled_from_step") or -1) + 1):]]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    import peft
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def skipped_peers(peaks: dict[str, float], tokens_per_step: int) -> dict[str, str]:
    """The bf16 peers -> why they cannot run here, when bf16 matmuls are far slower than fp32
    (no bf16 instructions: oneDNN refuses bf16 and a reference kernel runs it); else {}."""
    if peaks["bf16"] >= BF16_RUNNABLE * peaks["fp32"]:
        return {}
    minutes = 4 * flop_params(MODEL) * tokens_per_step / (peaks["bf16"] * 1e9) / 60
    why = (f"bf16 matmuls run at {peaks['bf16']:.1f} GFLOP/s here against fp32 "
           f"{peaks['fp32']:.0f} (this CPU has no bf16 instructions), so one bf16-autocast step "
           f"would take ~{minutes:.0f} min; the fp32 peers, eager and compiled, stand in")
    return dict.fromkeys(BF16_PEERS, why)


def run_training_section(args, tmp: Path, batches_path: Path, adapter: Path,
                         steps: int, repeats: int, configs: tuple[str, ...], label: str,
                         ) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    base = {"model": MODEL, "batches": str(batches_path), "adapter": str(adapter),
            "steps": steps, "lr": args.lr, "seed": args.seed, "clock": args.clock}
    for rnd in range(repeats):
        for name in configs:
            res = spawn("train", dict(base, name=name), tmp, f"{label}-{name}-{rnd}",
                        args.threads)
            runs[name].append(res)
            rates = steady_rates([res], min(WARMUP_STEPS, steps - 1))
            print(f"  [{label} {rnd + 1}/{repeats}] {name:9s} {res['precision']:14s} "
                  f"{statistics.median(rates):8.1f} tok/s  wall {res['wall_seconds']:6.1f} s  "
                  f"rss {res['peak_rss_mb']:7.0f} MB  loss {res['losses'][-1]:.4f}", flush=True)
    return runs


def summarize_training(runs: dict[str, list[dict[str, Any]]], steps: int,
                       n_flop: int, peaks: dict[str, float]) -> dict[str, Any]:
    skip = min(WARMUP_STEPS, steps - 1)
    tps = {c: statistics.median(steady_rates(r, skip)) for c, r in runs.items()}
    rss = {c: max(x["peak_rss_mb"] for x in r) for c, r in runs.items()}
    loss1 = {c: statistics.median(x["losses"][0] for x in r) for c, r in runs.items()}
    final = {c: statistics.median(x["losses"][-1] for x in r) for c, r in runs.items()}
    flops_per_token = 6 * n_flop
    limit = max(peaks, key=peaks.get)
    mfu_detail = {c: {f"vs_{d}_peak": tps[c] * flops_per_token / (peaks[d] * 1e9) for d in peaks}
                  for c in runs}
    return {
        "tokens_per_s": tps,
        "tokens_per_s_per_repeat": {c: [statistics.median(steady_rates([x], skip)) for x in r]
                                    for c, r in runs.items()},
        "candidate_precision": [x["precision"] for x in runs[CANDIDATE]],
        "candidate_compiled": [x.get("compiled", False) for x in runs[CANDIDATE]],
        "ratio_vs_bf16": ratio(tps[CANDIDATE], tps.get(REF_BF16)),
        "ratio_vs_bf16_compile": ratio(tps[CANDIDATE], tps.get(REF_BF16_COMPILE)),
        "ratio_vs_fp32": ratio(tps[CANDIDATE], tps[REF_FP32]),
        "ratio_vs_fp32_compile": ratio(tps[CANDIDATE], tps.get(REF_FP32_COMPILE)),
        "first_step_seconds": {c: [round(x["step_seconds"][0], 1) for x in r]
                               for c, r in runs.items()},
        "peak_rss_mb": rss,
        "peak_rss_ratio_vs_fp32": ratio(rss[CANDIDATE], rss[REF_FP32]),
        "peak_rss_ratio_ckpt_vs_fp32": (ratio(rss[CANDIDATE_CKPT], rss[REF_FP32])
                                        if CANDIDATE_CKPT in rss else None),
        "mfu": mfu_detail[CANDIDATE][f"vs_{limit}_peak"],
        "mfu_target": MFU_TARGET[limit],
        "mfu_vs_fp32_peak": mfu_detail[CANDIDATE]["vs_fp32_peak"],
        "mfu_vs_bf16_peak": mfu_detail[CANDIDATE]["vs_bf16_peak"],
        "mfu_real_limit": limit,
        "mfu_detail": mfu_detail,
        "mfu_definition": (f"tokens/s * 6N / measured matmul peak; N = {n_flop:,} parameters of "
                           "the transformer blocks (token embedding / tied LM head excluded; "
                           "LoRA and attention-score FLOPs not counted); 6N = 2N forward + 4N "
                           "backward by convention (frozen weights need no weight gradients, so "
                           "a LoRA step really executes ~4N: MFU x 2/3 is the share of executed "
                           "FLOPs)"),
        "flops_per_token": flops_per_token,
        "loss_step1": loss1,
        "final_loss": final,
        "final_loss_abs_diff_vs_fp32": {c: abs(final[c] - final[REF_FP32]) for c in runs},
        "loss_curves": {c: r[0]["losses"] for c, r in runs.items()},
        "step_seconds": {c: [[round(s, 3) for s in x["step_seconds"]] for x in r]
                         for c, r in runs.items()},
        "startup_seconds": {c: statistics.median(x["startup_seconds"] for x in r)
                            for c, r in runs.items()},
        "wall_seconds": {c: statistics.median(x["wall_seconds"] for x in r)
                         for c, r in runs.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small step counts; finishes in < 5 min")
    p.add_argument("--steps", type=int, help="optimizer steps per training run "
                   f"(the first {WARMUP_STEPS} are warm-up; default 12, quick 4)")
    p.add_argument("--repeats", type=int, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's "
                   "default, all cores); 1 gives steadier numbers on a machine shared with other "
                   "jobs, where multi-threaded ops stall on descheduled threads")
    p.add_argument("--e2e-steps", type=int, help="steps of the end-to-end runs (default 50; "
                   "quick: reuse the training runs' wall time)")
    p.add_argument("--cls-steps", type=int, help="classification steps (default 20, quick 5)")
    p.add_argument("--cls-padding", choices=["grouped", "longest", "max_length"],
                   default="grouped",
                   help="classification batches of sentences sorted by length, padded to each "
                        "batch's longest row (default: the peer's best configuration, "
                        "group_by_length; peftlab's Trainer groups so too), the same in file "
                        "order (longest: the peer's default DataCollatorWithPadding), or all "
                        "padded to 64 tokens (max_length: results before 2026-12-04)")
    p.add_argument("--gen-b1-prompts", type=int, help="prompts generated one by one "
                   "(default 8, quick 2)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by wall clock (default) or by each worker's CPU time "
                        "(needs --threads 1; robust on a machine shared with other jobs)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-cls", action="store_true")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--only-cls", action="store_true",
                   help="only the classification section; writes train_throughput_cls.*")
    p.add_argument("--only-gen", action="store_true",
                   help="only the generation section; writes train_throughput_gen.*")
    p.add_argument("--profile", choices=TRAIN_CONFIGS, help="profile a few steps of one training "
                   "configuration in-process and print the top ops; nothing else runs")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        run_worker(args, WORKERS[args.worker])
        return

    q = args.quick
    args.steps = args.steps or (4 if q else 12)
    args.repeats = args.repeats or (1 if q else 3)
    args.cls_steps = args.cls_steps or (5 if q else 20)
    args.gen_b1_prompts = args.gen_b1_prompts or (2 if q else 8)
    if args.e2e_steps is None and not q:
        args.e2e_steps = 50
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("error: --clock cpu needs --threads 1 (CPU time of several threads "
                         "counts their spin-waits)")
    if args.steps <= WARMUP_STEPS and not args.profile:
        raise SystemExit(f"error: --steps must be > {WARMUP_STEPS} (the warm-up steps are skipped)")
    if args.only_cls:
        require_file(SST2, "SST-2 data")
        run_only_cls(args)
        return
    if args.only_gen:
        require_file(ALPACA, "Alpaca data")
        run_only_gen(args)
        return
    require_file(ALPACA, "Alpaca data")
    # A SIGTERM should still remove the temp dir (batches, adapters: ~100 MB).
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    if not args.skip_cls:
        require_file(SST2, "SST-2 data")
    run(args)


def run(args) -> None:
    from peftlab.models import load_tokenizer

    started = time.perf_counter()
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"load average {machine['loadavg_start']}", flush=True)
    parent_peaks = best_matmul_gflops(5)
    n_flop = flop_params(MODEL)
    n_batches = max(args.steps, args.e2e_steps or 0)
    records = read_jsonl(ALPACA)
    tokenizer = load_tokenizer(MODEL)
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp_name:
        tmp = Path(tmp_name)
        batches = build_sft_batches(tokenizer, records, n_batches, args.batch_size, args.seq_len,
                                    source=str(ALPACA))
        batches_path = tmp / "sft_batches.safetensors"
        save_file(batches, str(batches_path))
        adapter = tmp / "adapter-sft"
        make_init_adapter(MODEL, adapter, args.seed)
        real = int(batches["attention_mask"][:args.steps].sum())
        labelled = int((batches["labels"][:args.steps, :, 1:] != IGNORE).sum())
        data = {"source": str(ALPACA), "rows": n_batches * args.batch_size,
                "pad_fraction": 1 - real / batches["attention_mask"][:args.steps].numel(),
                "labelled_fraction": labelled / real}
        print(f"data: {n_batches} batches of {args.batch_size}x{args.seq_len}, "
              f"{data['pad_fraction']:.1%} padding, {data['labelled_fraction']:.1%} of tokens "
              "labelled", flush=True)

        if args.profile:
            cfg = {"name": args.profile, "model": MODEL, "batches": str(batches_path),
                   "adapter": str(adapter), "steps": args.steps, "lr": args.lr, "seed": args.seed,
                   "out_dir": str(tmp / "profile"), "profile": True}
            res = train_worker(cfg)
            print(f"{args.profile}: steps {[round(s, 2) for s in res['step_seconds']]} s")
            return

        args.skipped_peers = skipped_peers(parent_peaks, args.batch_size * args.seq_len)
        train_configs = FP32_TRAIN_CONFIGS if args.skipped_peers else TRAIN_CONFIGS
        for name, why in args.skipped_peers.items():
            print(f"skipping {name}: {why}", flush=True)
        print(f"training: {args.repeats} round(s) x {list(train_configs)}, {args.steps} steps each",
              flush=True)
        runs = run_training_section(args, tmp, batches_path, adapter, args.steps, args.repeats,
                                    train_configs, "train")
        e2e = None
        if not args.skip_e2e:
            e2e = run_e2e(args, tmp, batches_path, adapter, runs)
        cls = None if args.skip_cls else run_cls(args, tmp)
        gen = None if args.skip_gen else run_gen(args, tmp, records, adapter)
    parent_peaks_end = best_matmul_gflops(5)
    peaks = _peaks([parent_peaks, parent_peaks_end]
                   + [x["matmul_gflops"] for r in runs.values() for x in r])
    train = summarize_training(runs, args.steps, n_flop, peaks)

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        **{k: train[k] for k in ("tokens_per_s", "ratio_vs_bf16", "ratio_vs_bf16_compile",
                                 "ratio_vs_fp32", "ratio_vs_fp32_compile", "peak_rss_mb", "peak_rss_ratio_vs_fp32", "mfu",
                                 "mfu_vs_fp32_peak", "mfu_vs_bf16_peak", "mfu_real_limit",
                                 "final_loss")},
        "cpu": machine["cpu"],
        "bf16_peak_gflops": peaks["bf16"],
        "fp32_peak_gflops": peaks["fp32"],
        "bf16_matmul_gflops": peaks["bf16"],  # older name of the same value
        "fp32_matmul_gflops": peaks["fp32"],
        "steps": args.steps, "warmup_steps": min(WARMUP_STEPS, args.steps - 1),
        "repeats": args.repeats, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "quick": args.quick, "model": MODEL, "machine": machine, "clock": args.clock,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": LORA_TARGETS},
        "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 0.0,
                      "schedule": "constant", "grad_clip": None},
        "data": data,
        "matmul_gflops_parent": {"start": parent_peaks, "end": parent_peaks_end},
        "training": train,
        "e2e": e2e, "classification": cls, "generation": gen,
        "skipped_peers": args.skipped_peers,
        "seconds": time.perf_counter() - started,
    }
    result["targets"] = targets(result)
    report = markdown(result)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "train_throughput.md").write_text(report + "\n")
    print(f"wrote {args.out / 'train_throughput.json'} and .md "
          f"({result['seconds']:.0f} s in total)")


def run_section_alone(args, key: str,
                      section: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """One section of the full run alone, with the machine and both matmul peaks measured
    before and after it; returns (result JSON with the section under ``key``, machine, peaks)."""
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    start_peaks = best_matmul_gflops(5)
    args.skipped_peers = skipped_peers(start_peaks, args.batch_size * args.seq_len)
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp_name:
        out = section(Path(tmp_name))
    peaks = _peaks([start_peaks, best_matmul_gflops(5)])
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"cpu": machine["cpu"], "bf16_peak_gflops": peaks["bf16"],
              "fp32_peak_gflops": peaks["fp32"], "machine": machine, "clock": args.clock,
              "repeats": args.repeats, "skipped_peers": args.skipped_peers, key: out}
    return result, machine, peaks


def _write_section(args, name: str, result: dict[str, Any], report: str) -> None:
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(report + "\n")


def run_only_gen(args) -> None:
    """The generation section alone (the full run's ``generation`` keys)."""
    def section(tmp: Path) -> dict[str, Any]:
        adapter = tmp / "adapter-sft"
        make_init_adapter(MODEL, adapter, args.seed)
        return run_gen(args, tmp, read_jsonl(ALPACA), adapter)

    result, machine, peaks = run_section_alone(args, "generation", section)
    gen = result["generation"]
    rows = [f"| batch {label[1:]} | {gen[label]['tokens_per_s'][CANDIDATE]:.1f} "
            f"({gen['candidate_precision']}) | {gen[label]['tokens_per_s']['ref']:.1f} | "
            f"{_f(gen[label]['tokens_per_s'].get('ref_bf16'), '.1f')} | {_x(gen[label]['ratio'])} | "
            f"{_x(gen[label]['ratio_vs_bf16'])} | {gen[label]['replies_match']} |"
            for label in ("b1", "b8")]
    report = "\n".join([
        "# Generation throughput: peftlab vs transformers generate", "",
        f"{MODEL}, greedy, KV cache, {gen['max_new_tokens']} new tokens, init LoRA merged; "
        f"batch 1 over {args.gen_b1_prompts} prompts and one batch of 8; {args.repeats} "
        f"alternating round(s), median. Machine: {machine['cpu']}, {machine['cores']} cores; "
        f"matmul peaks in this run: bf16 {peaks['bf16']:.0f}, fp32 {peaks['fp32']:.0f} GFLOP/s; "
        f"load average {machine['loadavg_start'][0]} at start, {machine['loadavg_end'][0]} at "
        "end.", "",
        "| | peftlab tokens/s | transformers fp32 | transformers bf16 | vs fp32 | vs bf16 | "
        "replies match the same-precision peer |",
        "|---|---:|---:|---:|---:|---:|---|", *rows, "",
        f"Targets: batch 8 >= {TARGETS['gen_b8'][0]:g}x, batch 1 >= {TARGETS['gen_b1'][0]:g}x "
        "the faster peer."])
    _write_section(args, "train_throughput_gen", result, report)


def _cls_width(cls: dict[str, Any]) -> str:
    """How the classification batches were padded, as the reports say it."""
    if "padding" not in cls:  # results before 2026-12-04: padded to seq_len
        return f"{cls['seq_len']}"
    width = {"max_length": f"{cls['seq_len']} (every row padded to it",
             "longest": f"the longest row (<= {cls['seq_len']}",
             "grouped": f"the longest row (<= {cls['seq_len']}; sentences sorted by length"}[
        cls["padding"]]
    return f"{width}; {cls['real_token_fraction']:.0%} of positions are real tokens)"


def run_only_cls(args) -> None:
    """The classification section alone (the full run's ``classification`` keys)."""
    result, machine, peaks = run_section_alone(args, "classification",
                                               lambda tmp: run_cls(args, tmp))
    cls = result["classification"]
    t = cls["tokens_per_s"]
    precision = {CANDIDATE: ", ".join(sorted(set(cls["candidate_precision"]))),
                 REF_BF16: "bf16 autocast", REF_FP32: "fp32"}
    report = "\n".join([
        "# Classification training throughput: peftlab vs transformers + peft", "",
        f"{cls['model']}, batch {cls['batch_size']} x {_cls_width(cls)}, {cls['steps']} steps x "
        f"{args.repeats} alternating round(s), LoRA r=8 on query/value + the classifier. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores; matmul peaks in this run: bf16 "
        f"{peaks['bf16']:.0f}, fp32 {peaks['fp32']:.0f} GFLOP/s; load average "
        f"{machine['loadavg_start'][0]} at start, {machine['loadavg_end'][0]} at end.", "",
        "| config | precision | tokens/s | vs bf16 ref | vs fp32 ref | peak RSS MB | final loss |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {c} | {precision[c]} | {t[c]:.0f} | "
          f"{_x(ratio(t[c], t.get(REF_BF16)))} | {_x(ratio(t[c], t[REF_FP32]))} | "
          f"{cls['peak_rss_mb'][c]:.0f} | {cls['final_loss'][c]:.4f} |" for c in CONFIGS
          if c in t), "",
        f"vs the best reference: {_x(cls['ratio_vs_best'])} (target "
        f"{TARGETS['cls_vs_best'][0]:g}x)."])
    _write_section(args, "train_throughput_cls", result, report)


def _quiet() -> None:
    """No progress bars or load reports from transformers/peft in the parent's output."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _peaks(samples: list[dict[str, float]]) -> dict[str, float]:
    """The best of all measurements in this run: a peak is what the machine *can* do."""
    return {d: max(s[d] for s in samples) for d in ("fp32", "bf16")}


def run_e2e(args, tmp: Path, batches_path: Path, adapter: Path,
            runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    configs = FP32_E2E_CONFIGS if getattr(args, "skipped_peers", None) else E2E_CONFIGS
    if args.e2e_steps is None or args.e2e_steps == args.steps:
        steps, source = args.steps, "the training runs above"
        e2e_runs = {c: runs[c] for c in configs}
    else:
        steps, source = args.e2e_steps, "separate runs"
        print(f"end-to-end: {configs}, {steps} steps", flush=True)
        e2e_runs = run_training_section(args, tmp, batches_path, adapter, steps, 1, configs,
                                        "e2e")
    wall = {c: statistics.median(x["wall_seconds"] for x in r) for c, r in e2e_runs.items()}
    startup = {c: statistics.median(x["startup_seconds"] for x in r) for c, r in e2e_runs.items()}
    mine = e2e_runs[CANDIDATE]
    return {"steps": steps, "source": source, "wall_seconds": wall, "startup_seconds": startup,
            "peak_rss_mb": {c: max(x["peak_rss_mb"] for x in r) for c, r in e2e_runs.items()},
            "candidate_compiled_from_step": [x.get("compiled_from_step") for x in mine],
            "candidate_heap_trims": [x.get("heap_trims", 0) for x in mine],
            **{f"ratio_vs_{peer[4:]}": ratio(wall[CANDIDATE], wall.get(peer))
               for peer in (REF_BF16, REF_BF16_COMPILE, REF_FP32, REF_FP32_COMPILE)},
            "definition": "interpreter start -> imports, model load, LoRA, compile, training, "
                          "adapter saved (batches pre-built by the parent, not included); the "
                          "inductor cache is warm from the training section's runs"}


def run_cls(args, tmp: Path) -> dict[str, Any]:
    from peftlab.models import load_tokenizer

    batch_size, seq_len, steps = 32, 64, args.cls_steps
    print(f"classification: {CLS_MODEL}, {steps} steps of {batch_size}x{seq_len} "
          f"(padding: {args.cls_padding})", flush=True)
    batches = build_cls_batches(load_tokenizer(CLS_MODEL), SST2, steps, batch_size, seq_len,
                                by_length=args.cls_padding == "grouped")
    path = tmp / "cls_batches.safetensors"
    save_file(batches, str(path))
    adapter = tmp / "adapter-cls"
    make_init_adapter(CLS_MODEL, adapter, args.seed, kind="sequence_classification", r=8,
                      alpha=16, targets=["query", "value"])
    base = {"model": CLS_MODEL, "batches": str(path), "adapter": str(adapter), "steps": steps,
            "lr": args.lr, "seed": args.seed, "clock": args.clock,
            "padding": "max_length" if args.cls_padding == "max_length" else "longest"}
    mask = batches["attention_mask"]
    width = mask.sum(dim=2).amax(dim=1, keepdim=True)  # each batch's longest row
    real = float(mask.sum() / (mask.numel() if args.cls_padding == "max_length"
                               else width.sum() * batch_size))
    configs = [c for c in CONFIGS if c not in getattr(args, "skipped_peers", {})]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rnd in range(args.repeats):
        for name in configs:
            res = spawn("cls", dict(base, name=name), tmp, f"cls-{name}-{rnd}", args.threads)
            runs[name].append(res)
            print(f"  [cls {rnd + 1}/{args.repeats}] {name:9s} {res['precision']:14s} "
                  f"{statistics.median(steady_rates([res], WARMUP_STEPS)):8.1f} tok/s  "
                  f"loss {res['losses'][-1]:.4f}", flush=True)
    tps = {c: statistics.median(steady_rates(r, WARMUP_STEPS)) for c, r in runs.items()}
    return {"model": CLS_MODEL, "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
            "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"],
                     "modules_to_save": ["classifier"]},
            "tokens_per_s": tps,
            "examples_per_s": {c: v * batch_size / statistics.mean(runs[c][0]["step_tokens"])
                               for c, v in tps.items()},  # the padded width varies by batch
            "candidate_precision": [x["precision"] for x in runs[CANDIDATE]],
            "ratio_vs_bf16": ratio(tps[CANDIDATE], tps.get(REF_BF16)),
            "ratio_vs_fp32": ratio(tps[CANDIDATE], tps[REF_FP32]),
            "ratio_vs_best": ratio(tps[CANDIDATE], max(tps.get(REF_BF16, 0.0), tps[REF_FP32])),
            "peak_rss_mb": {c: max(x["peak_rss_mb"] for x in r) for c, r in runs.items()},
            "final_loss": {c: statistics.median(x["losses"][-1] for x in r)
                           for c, r in runs.items()},
            "padding": args.cls_padding, "real_token_fraction": round(real, 3),
            "tokens": "padded positions (batch x the longest row, or x 64 with --cls-padding "
                      "max_length): the peer computes every one; peftlab computes the real "
                      "tokens, and in the last layer [CLS] alone (models/unpadded_encoder.py)"}


def run_gen(args, tmp: Path, records: list[dict[str, Any]], adapter: Path) -> dict[str, Any]:
    from peftlab.config import DataConfig
    from peftlab.data.sft import record_to_messages

    max_new = 64
    convs = [record_to_messages(r, DataConfig(), f"{ALPACA}:{i + 1}")[:-1]  # drop the answer
             for i, r in enumerate(records[-8:], start=len(records) - 8)]
    print(f"generation: {max_new} new tokens, batch 1 ({args.gen_b1_prompts} prompts) and "
          "batch 8", flush=True)
    base = {"model": MODEL, "adapter": str(adapter), "max_new_tokens": max_new,
            "conversations": convs, "b1_prompts": args.gen_b1_prompts, "clock": args.clock}
    # the peer as loaded (fp32, transformers' default) and cast to bf16; peftlab decodes in
    # what `precision: auto` picks here, and its replies are compared with the peer's in the
    # same precision (bf16 rounding can change greedy tokens)
    peers = ("ref",) if REF_BF16 in getattr(args, "skipped_peers", {}) else ("ref", "ref_bf16")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in (CANDIDATE, *peers)}
    for rnd in range(args.repeats):
        for name in runs:
            runs[name].append(spawn("gen", dict(base, name=name), tmp, f"gen-{name}-{rnd}",
                                       args.threads))
    precision = runs[CANDIDATE][0]["precision"]
    same = "ref_bf16" if precision == "bf16" else "ref"
    out: dict[str, Any] = {"max_new_tokens": max_new, "greedy": True, "kv_cache": True,
                           "adapter": "init adapter merged (B = 0)",
                           "candidate_precision": precision, "same_precision_peer": same}
    for label in ("b1", "b8"):
        n = sum(runs[same][0][label]["new_tokens"])
        match = all(x[label]["replies"] == runs[same][0][label]["replies"]
                    for name in (CANDIDATE, same) for x in runs[name])
        tps = {c: statistics.median(sum(x[label]["new_tokens"]) / x[label]["seconds"]
                                    for x in r) for c, r in runs.items()}
        best = max(peers, key=lambda c: tps[c])
        out[label] = {"tokens_per_s": tps, "new_tokens": n, "replies_match": match,
                      "ratio": ratio(tps[CANDIDATE], tps["ref"]),
                      "ratio_vs_bf16": ratio(tps[CANDIDATE], tps.get("ref_bf16")),
                      "ratio_vs_best": ratio(tps[CANDIDATE], tps[best]), "best_peer": best}
        print(f"  [gen {label}] peftlab ({precision}) {tps[CANDIDATE]:.1f} tok/s, transformers "
              f"fp32 {tps['ref']:.1f}, bf16 {_f(tps.get('ref_bf16'), '.1f')} tok/s, replies match the "
              f"{same} peer: {match}", flush=True)
    out["peak_rss_mb"] = {c: max(x["peak_rss_mb"] for x in r) for c, r in runs.items()}
    out["note"] = ("tokens/s: each run's own generated tokens (up to and including the stop "
                   "token) over its wall time")
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    train, e2e = result["training"], result["e2e"] or {}
    cls, gen = result["classification"] or {}, result["generation"] or {}
    rows = [
        ("train_vs_bf16", "training tokens/s vs transformers+peft bf16 autocast",
         train["ratio_vs_bf16"]),
        ("train_vs_bf16_compile", "training tokens/s vs the same under torch.compile(model)",
         train["ratio_vs_bf16_compile"]),
        ("loss_vs_fp32", "final loss, absolute difference from the fp32 reference's after "
         f"{len(train['loss_curves'][CANDIDATE])} steps",
         train["final_loss_abs_diff_vs_fp32"][CANDIDATE]),
        ("mfu", f"MFU vs the {train['mfu_real_limit']} matmul peak (the real limit)",
         train["mfu"]),
        ("e2e_vs_bf16", "end-to-end wall time vs bf16 reference", e2e.get("ratio_vs_bf16")),
        ("e2e_vs_bf16_compile", "end-to-end wall time vs the compiled bf16 reference",
         e2e.get("ratio_vs_bf16_compile")),
        ("rss_vs_fp32", "peak RSS vs fp32 reference (defaults)", train["peak_rss_ratio_vs_fp32"]),
        ("cls_vs_best", "classification tokens/s vs the best reference (bf16 or fp32)",
         cls.get("ratio_vs_best")),
        ("gen_b1", "generation tokens/s, batch 1, vs transformers generate (its faster of "
         "fp32 / bf16)", (gen.get("b1") or {}).get("ratio_vs_best")),
        ("gen_b8", "generation tokens/s, batch 8, vs transformers generate (its faster of "
         "fp32 / bf16)", (gen.get("b8") or {}).get("ratio_vs_best")),
        ("gen_b8_vs_fp32", "generation tokens/s, batch 8, vs transformers generate as loaded "
         "(fp32)", (gen.get("b8") or {}).get("ratio")),
    ]
    if result.get("skipped_peers"):  # no bf16 peers here: the same goals vs the fp32 ones
        rows[2:2] = [
            ("train_vs_fp32", "training tokens/s vs transformers+peft fp32 (no bf16 here)",
             train["ratio_vs_fp32"]),
            ("train_vs_fp32_compile", "training tokens/s vs the same under torch.compile(model)",
             train.get("ratio_vs_fp32_compile"))]
        rows[8:8] = [
            ("e2e_vs_fp32", "end-to-end wall time vs the fp32 reference", e2e.get("ratio_vs_fp32")),
            ("e2e_vs_fp32_compile", "end-to-end wall time vs the compiled fp32 reference",
             e2e.get("ratio_vs_fp32_compile"))]
    out = []
    for key, what, value in rows:
        target, higher = TARGETS[key]
        if key == "mfu":
            target = train["mfu_target"]
        met = None if value is None else (value >= target if higher else value <= target)
        out.append({"key": key, "what": what, "value": value,
                    "target": f"{'>=' if higher else '<='} {target:g}",
                    "status": "n/a" if met is None else "MET" if met else "MISSED"})
    return out


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _x(x: float | None) -> str:
    """A ratio cell: "1.29x", or "n/a" where the peer did not run."""
    return "n/a" if x is None else f"{x:.2f}x"


def markdown(r: dict[str, Any]) -> str:
    t, m = r["training"], r["machine"]
    lines = [
        "# Training throughput: peftlab vs transformers + peft",
        "",
        f"{MODEL}, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, AdamW lr {r['optimizer']['lr']:g}; "
        f"batch {r['batch_size']} x {r['seq_len']} packed Alpaca conversations "
        f"({r['data']['pad_fraction']:.1%} padding, {r['data']['labelled_fraction']:.1%} of "
        f"tokens labelled); {r['steps']} steps x {r['repeats']} round(s), median over steps "
        f"after the first {r['warmup_steps']}{' (--quick)' if r['quick'] else ''}; steps "
        f"timed by {'each worker' + chr(39) + 's CPU time (1 thread)' if r.get('clock') == 'cpu' else 'wall clock'}.",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; load average "
        f"{m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at end. Matmul peaks "
        f"measured in this run: fp32 {r['fp32_matmul_gflops']:.0f} GFLOP/s, bf16 "
        f"{r['bf16_matmul_gflops']:.0f} GFLOP/s (AMX: {m['amx_bf16']}).",
        "",
        *(f"Not run: {name} -- {why}." for name, why in r.get("skipped_peers", {}).items()),
        "",
        "| config | precision | tokens/s | vs bf16 ref | vs compiled bf16 ref | vs fp32 ref | "
        "vs compiled fp32 ref | first step s (per round) | peak RSS MB | MFU (fp32 peak) | "
        "MFU (bf16 peak) | loss step 1 | final loss |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    compiled = "compiled blocks" if any(t.get("candidate_compiled", [])) else "eager"
    labels = {CANDIDATE: f"peftlab (Trainer, defaults: {compiled})",
              REF_BF16: "transformers+peft bf16 autocast",
              REF_BF16_COMPILE: "transformers+peft bf16 autocast, torch.compile(model)",
              REF_FP32_COMPILE: "transformers+peft fp32, torch.compile(model)",
              CANDIDATE_CKPT: "peftlab + activation_checkpointing",
              REF_FP32: "transformers+peft fp32"}
    tps = t["tokens_per_s"]
    bf16_ran = REF_BF16 not in r.get("skipped_peers", {})  # else the bf16 peak means nothing
    for c in [c for c in (*TRAIN_CONFIGS, REF_FP32_COMPILE) if c in tps]:
        prec = ", ".join(sorted(set(t["candidate_precision"]))) if c == CANDIDATE else (
            "auto" if c == CANDIDATE_CKPT else
            "bf16 autocast" if c in BF16_PEERS else "fp32")
        mfu = t["mfu_detail"][c]
        first = ", ".join(f"{x:g}" for x in t.get("first_step_seconds", {}).get(c, []))
        lines.append(
            f"| {labels[c]} | {prec} | {tps[c]:.1f} | "
            f"{_x(ratio(tps[c], tps.get(REF_BF16)))} | "
            f"{_x(ratio(tps[c], tps.get(REF_BF16_COMPILE)))} | "
            f"{_x(ratio(tps[c], tps[REF_FP32]))} | "
            f"{_x(ratio(tps[c], tps.get(REF_FP32_COMPILE)))} | {first} | "
            f"{t['peak_rss_mb'][c]:.0f} | {mfu['vs_fp32_peak']:.1%} | "
            f"{format(mfu['vs_bf16_peak'], '.1%') if bf16_ran else 'n/a'} | "
            f"{t['loss_step1'][c]:.4f} | {t['final_loss'][c]:.4f} |")
    d = t["final_loss_abs_diff_vs_fp32"]
    lines += ["", f"Loss agreement after {r['steps']} steps: |peftlab - fp32 ref| = "
              f"{d[CANDIDATE]:.4f}, |bf16 ref - fp32 ref| = {_f(d.get(REF_BF16), '.4f')} (step 1, identical "
              f"weights: peftlab {t['loss_step1'][CANDIDATE]:.5f} vs fp32 ref "
              f"{t['loss_step1'][REF_FP32]:.5f}).", "", f"MFU: {t['mfu_definition']}.", ""]
    busy = max(m["loadavg_start"][0], m["loadavg_end"][0])
    if busy > m["cores"]:
        lines += [f"**Warning:** load average {busy} > {m['cores']} cores: other processes "
                  "shared the CPU, so absolute numbers are low and ratios noisy.", ""]
    if r["e2e"]:
        e = r["e2e"]
        w, st = e["wall_seconds"], e["startup_seconds"]
        peers = [c for c in (REF_BF16, REF_BF16_COMPILE, REF_FP32, REF_FP32_COMPILE) if c in w]
        lines += [f"End-to-end ({e['steps']} steps, {e['source']}): peftlab "
                  f"{w[CANDIDATE]:.1f} s (start-up {st[CANDIDATE]:.1f} s) vs "
                  + "; ".join(f"{labels[c]} {w[c]:.1f} s (start-up {st[c]:.1f} s): "
                              f"{_x(ratio(w[CANDIDATE], w[c]))}" for c in peers)
                  + f". {e['definition'][0].upper()}{e['definition'][1:]}.", ""]
        if "peak_rss_mb" in e:  # older results lack these
            rss = e["peak_rss_mb"]
            lines += [f"Peak RSS over those steps: peftlab {rss[CANDIDATE]:.0f} MB (compiled "
                      f"from step {e['candidate_compiled_from_step']}, heap trims "
                      f"{e['candidate_heap_trims']}), "
                      + ", ".join(f"{labels[c]} {rss[c]:.0f} MB" for c in peers) + ".", ""]
    if r["classification"]:
        c = r["classification"]
        lines += [f"Classification ({c['model']}, batch {c['batch_size']} x {_cls_width(c)}, "
                  f"{c['steps']} steps, LoRA r=8 query/value + classifier): tokens/s peftlab "
                  f"{c['tokens_per_s'][CANDIDATE]:.0f} ({', '.join(sorted(set(c['candidate_precision'])))}), "
                  f"bf16 ref {_f(c['tokens_per_s'].get(REF_BF16), '.0f')}, fp32 ref "
                  f"{c['tokens_per_s'][REF_FP32]:.0f}; final loss "
                  + ", ".join(f"{k} {v:.4f}" for k, v in c["final_loss"].items()) + ".", ""]
    if r["generation"]:
        g = r["generation"]
        tps = {lab: g[lab]["tokens_per_s"] for lab in ("b1", "b8")}
        parts = [f"batch {lab[1:]}: peftlab {tps[lab][CANDIDATE]:.1f} vs transformers fp32 "
                 f"{tps[lab]['ref']:.1f} / bf16 {_f(tps[lab].get('ref_bf16'), '.1f')} "
                 f"tokens/s ({g[lab]['new_tokens']} tokens, replies match the same-precision "
                 f"peer: {g[lab]['replies_match']})" for lab in ("b1", "b8")]
        lines += [f"Generation (greedy, KV cache, {g['max_new_tokens']} new tokens, merged "
                  f"LoRA; peftlab in {g.get('candidate_precision', 'fp32')} by "
                  f"`precision: auto`): " + "; ".join(parts) + ".", ""]
    lines += ["| target | measured | goal | status |", "|---|---:|---:|---|"]
    for row in r["targets"]:
        value = row["value"]
        key = row["key"]
        shown = "n/a" if value is None else (f"{value:.1%}" if key == "mfu" else
                                             f"{value:.4f}" if key == "loss_vs_fp32" else
                                             f"{value:.2f}x")
        goal = (f">= {r['training']['mfu_target']:.0%}" if key == "mfu" else
                row["target"] if key == "loss_vs_fp32" else f"{row['target']}x")
        lines.append(f"| {row['what']} | {shown} | {goal} | {row['status']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
