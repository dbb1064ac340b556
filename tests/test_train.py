"""Trainer behaviour on a tiny random Llama: loss falls, outputs exist, resume is exact,
gradient accumulation is exact, the label-only LM head equals the full forward loss, the
optimizer sees the scheduled lr and the clipped gradient, validation ignores dropout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.config import from_dict
from peftlab.data.sft import build_sft_examples, ensure_chat_template
from peftlab.methods import get_method
from peftlab.models import load_model
from peftlab.runtime import checkpoint as ckpt
from peftlab.tasks.sft.task import SFTTask
from peftlab.training.trainer import Trainer


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, **train) -> dict:
    return {
        "model": str(model_dir),
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": train.pop("dropout", 0.0),
                   "init": train.pop("init", "kaiming")},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_rows": train.pop("max_rows", 64)},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                  "log_every": 1, **train},
        "output_dir": str(out),
    }


def test_training_reduces_loss_and_writes_outputs(tiny_chat_model_dir, demo_data_dir, tmp_path):
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "run", epochs=3, max_rows=96,
               precision="bf16")
    summary = peftlab.train(cfg, progress=False)
    losses = [r["loss"] for r in summary.result.history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    val = [r["val_loss"] for r in summary.result.history if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "data_report.json", "report.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "checkpoints/best/trainable.safetensors"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and "tokens_per_s" in lines[0]
    assert json.loads((out / "data_report.json").read_text())["train"]["kept"] == 96


def _perturb(run: Path, what: str) -> None:
    """Change one part of the step-3 checkpoint of a copied run (see the resume test)."""
    step3 = run / "checkpoints" / "step-0000003"
    if what == "weights":
        path = step3 / "trainable.safetensors"
        tensors = {k: v * 1.5 if "lora_B" in k else v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
    elif what == "optimizer":  # Adam's second moments: a 4x larger one halves the next updates
        path = step3 / "optimizer.safetensors"
        tensors = {k: v * 4 if k.endswith("exp_avg_sq") else v
                   for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
    else:
        path = step3 / ckpt.STATE_FILE
        state = json.loads(path.read_text())
        if what == "rng":  # other dropout masks from step 4 on
            state["torch_rng"] = torch.Generator().manual_seed(123).get_state().tolist()
        else:  # "micro": the data cursor, so steps 4-6 see other batches
            state["micro"] += 1
        path.write_text(json.dumps(state))


def test_resume_continues_to_the_same_result(tiny_chat_model_dir, demo_data_dir, tmp_path,
                                             capsys):
    # dropout > 0 makes the result depend on the restored RNG state too
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "a", max_steps=6, save_every=3,
               dropout=0.1, batch_size=4)
    first = peftlab.train(cfg, progress=False).result.history
    straight = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))

    out = tmp_path / "b"
    cfg_b = dict(cfg, output_dir=str(out))
    peftlab.train(cfg_b, progress=False)
    ckpt_dir = out / "checkpoints"
    # simulate a crash after step 3: no later checkpoint, no final adapter (a resume that
    # ignored the checkpoint and retrained from scratch with the same seed would still write
    # the same adapter), a half-written checkpoint
    for p in ckpt_dir.glob("step-0000006*"):
        shutil.rmtree(p)
    shutil.rmtree(out / "adapter")
    (ckpt_dir / "step-0000005.tmp").mkdir()
    assert ckpt.latest_checkpoint(ckpt_dir).name == "step-0000003"
    perturbed = ("weights", "optimizer", "rng", "micro")
    for what in perturbed:
        shutil.copytree(out, tmp_path / f"b-{what}")
        _perturb(tmp_path / f"b-{what}", what)

    capsys.readouterr()
    summary = peftlab.train(cfg_b, resume=True, progress=False)
    assert f"resumed from {ckpt_dir / 'step-0000003'} at step 3" in capsys.readouterr().out
    assert summary.result.steps == 6
    # this run trained steps 4-6 only, with the losses of the straight run
    resumed_losses = {r["step"]: r["loss"] for r in summary.result.history if "loss" in r}
    assert sorted(resumed_losses) == [4, 5, 6]
    for r in first:
        if r["step"] in resumed_losses and "loss" in r:
            assert resumed_losses[r["step"]] == pytest.approx(r["loss"], abs=2e-5)
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]

    # Every part of the checkpoint is used: perturbing one changes the result. Three Adam
    # steps at lr 3e-3 move each weight by up to ~1e-2, 10^4 x the tolerance above.
    for what in perturbed:
        peftlab.train(dict(cfg, output_dir=str(tmp_path / f"b-{what}")), resume=True,
                      progress=False)
        other = load_file(str(tmp_path / f"b-{what}" / "adapter" / "adapter_model.safetensors"))
        diff = max(float((other[k] - straight[k]).abs().max()) for k in straight)
        assert diff > 1e-4, what


def test_checkpoint_pruning_and_latest_for_resume(tmp_path):
    """resume=True takes the newest *complete* step-N checkpoint; pruning keeps the newest
    ``keep`` and never touches half-written (.tmp) or best checkpoints."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for n in (1, 2, 10, 3):
        ckpt.save_checkpoint(tmp_path / f"step-{n:07d}", model, opt, {"step": n, "micro": n})
    (tmp_path / "step-0000011.tmp").mkdir()  # a crash while writing step 11
    (tmp_path / "step-0000012").mkdir()  # no state file: not complete
    (tmp_path / "best").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000010"  # by number, not by name
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best", "step-0000010", "step-0000011.tmp", "step-0000012"]
    ckpt.prune_checkpoints(tmp_path, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step-0000011.tmp"]
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_resume_into_a_different_model_names_the_mismatch(tiny_chat_model_dir, tmp_path):
    from peftlab.methods.lora import LoraConfig, apply_lora

    model, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ckpt.save_checkpoint(tmp_path / "c", model, opt, {"step": 1})
    other, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(other, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="does not match the model") as err:
        ckpt.load_checkpoint(tmp_path / "c", other)
    # the first three names of each side (of 4), not all of them
    missing, unexpected = str(err.value).split("missing ")[1].split(", unexpected ")
    assert missing.count("v_proj.lora_") == 3 and unexpected.count("q_proj.lora_") == 3


def _trainer(model_dir: Path, data: dict[str, Path], out: Path, rows: int = 8,
             val_rows: int = 0, **train) -> tuple[Trainer, list[dict]]:
    """A Trainer on ``rows`` demo examples (LoRA with random A and B: every weight gets a
    gradient), built directly so a test can watch its optimizer."""
    cfg = from_dict(_cfg(model_dir, data, out, **{"init": "random", **train}))
    model, tok = load_model(str(model_dir))
    ensure_chat_template(tok)
    lines = data["train"].read_text().splitlines()[:rows + val_rows]
    examples, _ = build_sft_examples([json.loads(x) for x in lines], tok, cfg.data, 256,
                                     source="t")
    torch.manual_seed(0)
    get_method("lora").apply(model, cfg.method, "default")
    task = SFTTask(pad_id=tok.pad_token_id)
    trainer = Trainer(model, task, examples[:rows], examples[rows:], cfg.train, out,
                      progress=False)
    return trainer, examples[:rows]


def _watch_optimizer(trainer: Trainer) -> list[dict[str, Any]]:
    """Record, at every optimizer step, the lr it uses and the gradients it is given."""
    seen: list[dict[str, Any]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append({"lr": [g["lr"] for g in trainer.optimizer.param_groups],
                     "grads": [p.grad.detach().clone() for p in trainer.params]})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def _full_batch_gradient(trainer: Trainer, examples: list[dict]) -> list[torch.Tensor]:
    """d(mean loss over every target token of ``examples``)/d(trainable params), in one batch."""
    batch = trainer.task.collate(examples)
    loss_sum, n = trainer.task.loss(trainer.model.train(), batch)
    return list(torch.autograd.grad(loss_sum / n, trainer.params))


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


@pytest.mark.parametrize("bs, accum", [(8, 1), (4, 2), (2, 4)])
def test_gradient_accumulation_equals_large_batch(tiny_chat_model_dir, demo_data_dir, tmp_path,
                                                  bs, accum):
    """The gradient the optimizer gets is the token-mean over the whole step, whatever the
    split into micro-batches, which here hold different numbers of target tokens (a mean of
    per-micro-batch means, or a gradient scaled by grad_accum, would differ)."""
    trainer, examples = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, batch_size=bs,
                                 grad_accum=accum, max_steps=1, warmup_steps=0,
                                 max_grad_norm=None)
    expected = _full_batch_gradient(trainer, examples)
    micro = next(trainer._step_groups(0))
    assert sorted(i for idx in micro for i in idx) == list(range(8))  # one step: all 8 rows
    counts = [trainer.task.count(trainer.task.collate([examples[i] for i in idx]))
              for idx in micro]
    assert len(micro) == accum and (accum == 1 or len(set(counts)) > 1), counts
    seen = _watch_optimizer(trainer)
    trainer.fit()
    assert len(seen) == 1
    for got, want in zip(seen[0]["grads"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_lr_schedule_and_clipping_reach_the_optimizer(tiny_chat_model_dir, demo_data_dir,
                                                      tmp_path):
    """Logged lr = the optimizer's lr = hand-computed warm-up + linear decay; logged
    grad_norm = the unclipped norm computed by hand; the optimizer gets the clipped gradient."""
    trainer, examples = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, batch_size=8,
                                 max_steps=4, warmup_steps=2, scheduler="linear", lr=1e-2)
    first = _full_batch_gradient(trainer, examples)  # step 1 sees all 8 rows at the initial weights
    max_norm = 0.5 * _norm(first)
    trainer.cfg.max_grad_norm = max_norm  # clipping is active at step 1
    seen = _watch_optimizer(trainer)
    result = trainer.fit()

    # warm-up over 2 steps (1/2, 2/2), then linear decay over the other 2 (1 - 0/2, 1 - 1/2)
    expected_lr = [1e-2 * 0.5, 1e-2 * 1.0, 1e-2 * 1.0, 1e-2 * 0.5]
    logged = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["lr"] for r in logged] == pytest.approx(expected_lr, rel=1e-12)
    assert all(len(s["lr"]) == 1 for s in seen)
    assert [s["lr"][0] for s in seen] == pytest.approx(expected_lr, rel=1e-12)

    assert logged[0]["grad_norm"] == pytest.approx(_norm(first), abs=1e-4)
    for got, want in zip(seen[0]["grads"], first, strict=True):
        torch.testing.assert_close(got, want * (max_norm / _norm(first)), rtol=1e-4, atol=1e-7)
    for record, step in zip(logged, seen, strict=True):  # every step: clipped to max_norm
        assert _norm(step["grads"]) == pytest.approx(min(record["grad_norm"], max_norm),
                                                     rel=1e-3)


def test_validation_ignores_dropout_and_keeps_train_mode(tiny_chat_model_dir, demo_data_dir,
                                                         tmp_path):
    """With dropout 0.5 the validation loss is still deterministic: it is computed in eval
    mode, equals the loss of the same weights without dropout, and training mode returns."""
    trainer, _ = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, val_rows=8,
                          dropout=0.5, max_steps=1)
    model = trainer.model.train()
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and model.training
    batch = trainer.task.collate(trainer.val_examples)
    with torch.no_grad():
        torch.manual_seed(0)
        noisy = [trainer.task.loss(model, batch) for _ in range(2)]
        assert noisy[0][0] != noisy[1][0]  # dropout really is active in training mode
        loss_sum, n = trainer.task.loss(model.eval(), batch)
    assert first["val_loss"] == pytest.approx(float(loss_sum / n), abs=1e-5)


def test_logging_evaluation_and_throughput_schedule(tiny_chat_model_dir, demo_data_dir, tmp_path,
                                                    monkeypatch):
    """log_every, eval_every and the end of each epoch decide which steps are logged and
    evaluated; tokens_per_s is the tokens of the steps since the last record over their
    training time (a fake clock that ticks 0.5 s per reading makes it exact; evaluation
    time is not in it)."""
    import peftlab.training.trainer as trainer_module

    # 8 rows in micro-batches of 4: an epoch is 2 steps
    trainer, examples = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, val_rows=4,
                                 batch_size=4, max_steps=7, log_every=3, eval_every=5)
    assert not any(getattr(m, "gradient_checkpointing", False)  # off unless asked
                   for m in trainer.model.modules())
    ticks = iter(range(10_000))
    monkeypatch.setattr(trainer_module, "time",
                        type("Clock", (), {"perf_counter": lambda: 0.5 * next(ticks)}))
    result = trainer.fit()
    logged = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in logged] == [1, 3, 6, 7]  # step 1, every 3rd, the last
    evaluated = [r["step"] for r in result.history if "val_loss" in r]
    assert evaluated == [2, 4, 5, 6, 7]  # ends of epochs, every 5th, the last
    assert [r["epoch"] for r in logged] == [0.5, 1.5, 3.0, 3.5]

    tokens = {}  # attention-mask tokens of each step's micro-batch
    for step, group in zip(range(1, 8), trainer._step_groups(0), strict=False):
        tokens[step] = sum(len(examples[i]["input_ids"]) for idx in group for i in idx)
    assert result.tokens == sum(tokens.values())
    windows = {1: [1], 3: [2, 3], 6: [4, 5, 6], 7: [7]}  # the steps each record speaks for
    for r in logged:  # one 0.5 s tick between the start and the end of each step
        steps = windows[r["step"]]
        assert r["tokens_per_s"] == pytest.approx(
            sum(tokens[s] for s in steps) / (0.5 * len(steps)), abs=0.05)


def test_logged_loss_is_the_mean_over_the_log_window(tiny_chat_model_dir, demo_data_dir,
                                                     tmp_path):
    """A record's loss is the mean of the step losses since the previous record (as the HF
    Trainer logs), step_loss the last one; a run resumed inside a window logs the same."""
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "each", max_steps=6,
               batch_size=4, save_every=3)
    each = {r["step"]: r["loss"] for r in
            peftlab.train(cfg, progress=False).result.history if "loss" in r}
    assert sorted(each) == [1, 2, 3, 4, 5, 6] and len(set(each.values())) == 6

    out = tmp_path / "windows"
    cfg4 = dict(cfg, output_dir=str(out), train=dict(cfg["train"], log_every=4))
    logged = [r for r in peftlab.train(cfg4, progress=False).result.history if "loss" in r]
    assert [r["step"] for r in logged] == [1, 4, 6]
    expected = {1: [1], 4: [2, 3, 4], 6: [5, 6]}
    for r in logged:
        mean = sum(each[s] for s in expected[r["step"]]) / len(expected[r["step"]])
        assert r["loss"] == pytest.approx(mean, abs=2e-5)
        assert r["step_loss"] == pytest.approx(each[r["step"]], abs=2e-5)

    # resume from step 3, in the middle of the window that ends at step 4
    for p in (out / "checkpoints").glob("step-0000006*"):
        shutil.rmtree(p)
    resumed = peftlab.train(cfg4, resume=True, progress=False).result.history
    assert [(r["step"], r["loss"]) for r in resumed if "loss" in r] == \
        [(r["step"], r["loss"]) for r in logged if r["step"] > 3]


def test_each_epoch_reshuffles_and_resume_continues_the_order(tiny_chat_model_dir,
                                                              demo_data_dir, tmp_path):
    trainer, _ = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, batch_size=2,
                          max_steps=1)
    groups = trainer._step_groups(0)
    epochs = [[tuple(i for idx in next(groups) for i in idx) for _ in range(4)]
              for _ in range(4)]  # 4 epochs of 4 micro-batches of 2 rows
    for epoch in epochs:
        assert sorted(i for batch in epoch for i in batch) == list(range(8))
    assert len({tuple(e) for e in epochs}) > 1  # a new order per epoch (seeded by epoch)
    flat = [b for e in epochs for b in e]
    resumed = trainer._step_groups(6)  # after 6 micro-batches: mid-epoch 2
    assert [tuple(i for idx in next(resumed) for i in idx) for _ in range(10)] == flat[6:]


def test_compile_blocks_finds_the_transformer_blocks(tiny_chat_model_dir):
    from peftlab.training.compile import compile_blocks

    model, _ = load_model(str(tiny_chat_model_dir))
    assert compile_blocks(model) == 2  # the two decoder layers, nothing else
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in model.model.layers)
    with pytest.raises(peftlab.ConfigError, match="cannot find the transformer blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compile_auto_compiles_only_where_it_pays(tiny_chat_model_dir, monkeypatch):
    """train.compile: auto -> on for a CPU run of a big-enough model and a long-enough run;
    off otherwise, with the reason; explicit true/false are obeyed."""
    from peftlab.config import TrainConfig
    from peftlab.training import compile as compile_mod

    model, _ = load_model(str(tiny_chat_model_dir))
    resolve = compile_mod.resolve_compile
    on, why = resolve(TrainConfig(precision="bf16"), model, 500)
    assert not on and "parameters" in why  # a tiny model: the compile would cost more
    monkeypatch.setattr(compile_mod, "AUTO_MIN_PARAMS", 1000)
    # nothing up front against it: decided after timing eager steps (None = pending)
    assert resolve(TrainConfig(precision="bf16"), model, 500)[0] is None
    assert resolve(TrainConfig(precision="bf16"), model, 50, 2048)[0] is None
    assert "steps" in resolve(TrainConfig(precision="bf16"), model, 49)[1]
    assert "tokens per step" in resolve(TrainConfig(precision="bf16"), model, 500, 100)[1]
    # the timed half: the remaining steps at the measured eager pace must repay the compile
    limit = compile_mod.AUTO_MIN_SECONDS
    assert compile_mod.compile_pays(limit / 48, 48)[0]
    on, why = compile_mod.compile_pays(limit / 48 * 0.9, 48)
    assert not on and why.startswith("off: 48 more steps") and f"< {limit} s" in why
    # fp32 too (+12% tokens/s, -32% peak RSS on an fp32-only EPYC): decided by timing
    assert resolve(TrainConfig(precision="fp32"), model, 500) == (
        None, "decided after 2 eager steps (fp32, 0M parameters, 500 steps)")
    # checkpointed blocks compile whole too (9-11% faster, less peak RSS than checkpointed eager)
    assert resolve(TrainConfig(precision="fp32", activation_checkpointing=True), model, 500)[0] is None
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    assert "C++ compiler" in resolve(TrainConfig(precision="bf16"), model, 500)[1]
    assert resolve(TrainConfig(precision="fp32", compile=True), model, 1) == (True, "on")
    assert resolve(TrainConfig(precision="bf16", compile=False), model, 500) == (False, "off")
    assert TrainConfig().compile == "auto"
    with pytest.raises(peftlab.ConfigError, match="expected true, false or auto"):
        from_dict({"model": "x", "data": {"train": "t.jsonl"}, "train": {"compile": "yes"}})


@pytest.mark.parametrize("pays", [True, False])
def test_compile_auto_times_eager_steps_then_decides(tiny_chat_model_dir, demo_data_dir,
                                                     tmp_path, monkeypatch, pays):
    """compile: auto with nothing against it up front: the first AUTO_MEASURE_STEPS steps run
    eager, then the blocks compile for the rest only if compile_pays says so (given the last
    eager step's time and the steps left). Compiled blocks run while fit trains and validates,
    and the model leaves fit eager, so generation afterwards does not recompile for every
    KV-cache shape."""
    from torch._dynamo.utils import counters

    from peftlab.training import compile as compile_mod
    from peftlab.training import trainer as trainer_mod

    for name, value in [("AUTO_MIN_PARAMS", 1), ("AUTO_MIN_STEPS", 1),
                        ("AUTO_MIN_STEP_TOKENS", 1)]:
        monkeypatch.setattr(compile_mod, name, value)
    asked = []
    monkeypatch.setattr(trainer_mod, "compile_pays",
                        lambda seconds, remaining: asked.append((seconds, remaining))
                        or (pays, "on" if pays else "off"))
    trainer, _ = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, rows=4, val_rows=4,
                          max_steps=4, batch_size=4, eval_every=1, precision="bf16")
    assert trainer.compile_pending and not trainer.compiled
    blocks = list(trainer.model.model.layers)
    counters.clear()
    seen = []
    trainer.on_evaluate = lambda step, rec: seen.append(
        blocks[0]._compiled_call_impl is not None) and False
    trainer.fit()
    assert len(asked) == 1 and asked[0][0] > 0 and asked[0][1] == 2  # after 2 of 4 steps
    assert seen == [False, False, pays, pays]
    assert trainer.compiled is pays and trainer.compiled_from_step == (2 if pays else None)
    assert all(b._compiled_call_impl is None for b in blocks)
    # LoRA's fused Function under bf16 autocast: torch's on-disk autograd cache keeps the
    # graphs (an autocast region or an uncacheable op would bypass it: slower warm starts)
    cache = counters["aot_autograd"]
    assert cache["autograd_cache_bypass"] == 0
    assert (cache["autograd_cache_saved"] + cache["autograd_cache_hit"] > 0) is pays


def test_steps_timed_for_compile_auto_run_half_the_rows_at_a_time(tiny_chat_model_dir,
                                                                  demo_data_dir, tmp_path,
                                                                  monkeypatch):
    """The eager steps compile: auto times run as two half batches (their activations would
    otherwise set the run's peak memory): the same gradients, then whole batches again."""
    from peftlab.tasks.base import halve_rows
    from peftlab.training import compile as compile_mod
    from peftlab.training import trainer as trainer_mod

    for name in ("AUTO_MIN_PARAMS", "AUTO_MIN_STEPS", "AUTO_MIN_STEP_TOKENS"):
        monkeypatch.setattr(compile_mod, name, 1)
    monkeypatch.setattr(trainer_mod, "compile_pays", lambda seconds, remaining: (False, "off"))
    runs = {}
    for mode in ("auto", False):
        trainer, examples = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path / str(mode),
                                     rows=8, max_steps=3, batch_size=4, precision="fp32",
                                     compile=mode)
        rows: list[int] = []
        loss = trainer.task.loss
        trainer.task.loss = lambda model, batch, loss=loss, rows=rows: rows.append(
            len(batch["input_ids"])) or loss(model, batch)
        seen = _watch_optimizer(trainer)
        trainer.fit()
        runs[mode] = rows, seen
    assert runs["auto"][0] == [2, 2, 2, 2, 4] and runs[False][0] == [4, 4, 4]
    for auto, whole in zip(runs["auto"][1], runs[False][1], strict=True):
        for a, b in zip(auto["grads"], whole["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    first, second = halve_rows(batch)
    assert first["input_ids"].tolist() == [[0, 1], [2, 3], [4, 5]] and second["labels"].tolist() == [3, 4]
    assert halve_rows({"input_ids": torch.zeros(1, 3)})[0]["input_ids"].shape == (1, 3)
    assert len(halve_rows({"input_ids": torch.zeros(4, 3), "meta": "x"})) == 1
    whole = trainer.task.collate(examples[:3])
    halves = trainer.task.split_rows(whole)
    assert [h["num_target_tokens"] for h in halves] == [trainer.task.count(h) for h in halves]
    assert sum(trainer.task.count(h) for h in halves) == whole["num_target_tokens"] > 0


def test_label_only_head_equals_full_forward_loss(tiny_chat_model_dir, demo_data_dir):
    model, tok = load_model(str(tiny_chat_model_dir))
    ensure_chat_template(tok)
    cfg = from_dict({"model": "x", "data": {"train": str(demo_data_dir["train"])}})
    rows = [json.loads(x) for x in demo_data_dir["train"].read_text().splitlines()[:6]]
    examples, _ = build_sft_examples(rows, tok, cfg.data, 256, source="t")
    task = SFTTask(pad_id=tok.pad_token_id, chunk_size=7)  # several chunks
    batch = task.collate(examples)
    assert not batch["attention_mask"].all()  # right padding: the causal-only path is taken
    masks = []
    model.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    loss_sum, n = task.loss(model, batch)
    assert masks == [None]  # no padding mask: SDPA's causal kernel
    assert n == task.count(batch) > 0
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-5, atol=1e-5)
    left = {k: v.flip(1) if torch.is_tensor(v) and v.ndim == 2 else v  # left padding: the
            for k, v in batch.items()}  # mask must be kept
    task.loss(model, left)
    assert masks[-1] is not None


def test_bf16_path_tracks_fp32(tiny_chat_model_dir, demo_data_dir, tmp_path):
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / precision, max_steps=8,
                   precision=precision)
        summary = peftlab.train(cfg, progress=False)
        curves[precision] = [r["loss"] for r in summary.result.history if "loss" in r]
    # The tolerance comes from the effect under test: 8 fp32 steps lower the loss by ~0.1 nats
    # (6.28 -> 6.18); bf16 rounding moves it by ~3e-4. A bf16 path that did not train would
    # be off by up to the whole drop; one that tracks fp32 stays within a tenth of it.
    fp32, bf16 = curves["fp32"], curves["bf16"]
    drop = fp32[0] - min(fp32[-3:])
    assert drop > 0.05, fp32
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) < 0.1 * drop, (fp32, bf16)
    assert bf16[0] - min(bf16[-3:]) > 0.9 * drop


def test_no_trainable_params_and_empty_data_are_clear_errors(tiny_chat_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = {"model": str(tiny_chat_model_dir), "data": {"train": str(empty)},
           "output_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="empty"):
        peftlab.train(cfg, progress=False)


class _ScriptedMetricTask(SFTTask):
    """SFT loss, plus a scripted 'accuracy' so best-keeping and early stopping are testable."""

    def __init__(self, pad_id, values):
        super().__init__(pad_id)
        self.values = iter(values)

    def metrics(self, model, examples, batch_size, precision):
        return {"accuracy": next(self.values)}


def test_best_metric_and_early_stopping(tiny_chat_model_dir, demo_data_dir, tmp_path):
    cfg = from_dict(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path, max_steps=10,
                         eval_every=1, best_metric="val_accuracy", early_stopping_patience=2))
    model, tok = load_model(str(tiny_chat_model_dir))
    ensure_chat_template(tok)
    rows = [json.loads(x) for x in demo_data_dir["train"].read_text().splitlines()[:32]]
    examples, _ = build_sft_examples(rows, tok, cfg.data, 256, source="t")
    get_method("lora").apply(model, cfg.method, "default")
    task = _ScriptedMetricTask(tok.pad_token_id, [0.5, 0.6, 0.4, 0.3, 0.9])
    trainer = Trainer(model, task, examples, examples[:8], cfg.train, tmp_path, progress=False)
    result = trainer.fit()
    assert result.steps == 4 and result.best_step == 2 and result.best_value == 0.6
    best = load_file(str(tmp_path / "checkpoints" / "best" / "trainable.safetensors"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), best[name])
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in logged if "val_accuracy" in r] == [0.5, 0.6, 0.4, 0.3]


def test_compiled_blocks_train_like_eager(tiny_chat_model_dir, demo_data_dir, tmp_path):
    """train.compile (inductor blocks) on batches of varying length: same losses as eager."""
    histories = []
    for compile_ in (False, True):
        cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / f"c{compile_}", max_steps=3,
                   batch_size=4, compile=compile_)
        summary = peftlab.train(cfg, progress=False)
        histories.append([r for r in summary.result.history if "loss" in r or "val_loss" in r])
    eager, compiled = histories
    assert len(eager) == len(compiled) >= 3
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a, b)


def test_resume_takes_the_attention_kernels_of_the_first_part(tiny_chat_model_dir,
                                                              demo_data_dir, tmp_path,
                                                              monkeypatch):
    """The eager CPU attention kernel is timed per process; a timing in the resumed process
    (under other load) could pick the other kernel and change the rounding. The checkpoint
    records the choices and the resume uses them instead of timing again."""
    from peftlab.runtime import cpu_attention

    monkeypatch.setattr(cpu_attention, "_CHOICES", {})
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "a", max_steps=2, save_every=1,
               batch_size=4)
    peftlab.train(cfg, progress=False)
    saved = ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints") / ckpt.STATE_FILE
    kernels = json.loads(saved.read_text())["attention_kernels"]
    assert kernels == cpu_attention.choices_state() and len(kernels) >= 1
    flipped = [[*k[:5], not k[5]] for k in kernels]  # what the first part "measured"
    state = json.loads(saved.read_text())
    saved.write_text(json.dumps(dict(state, attention_kernels=flipped)))
    monkeypatch.setattr(cpu_attention, "_CHOICES", {})
    monkeypatch.setattr(cpu_attention, "_time_grouped_vs_sdpa",
                        lambda *a: pytest.fail("a resumed run must not time again"))
    shutil.rmtree(tmp_path / "a" / "adapter")
    peftlab.train(dict(cfg, train=dict(cfg["train"], max_steps=3)), resume=True,
                  progress=False)
    assert cpu_attention.choices_state()[:len(flipped)] == flipped


@pytest.mark.parametrize("keep", [True, False])
def test_fit_on_a_cpu_keeps_freed_memory_unless_told_not_to(tiny_chat_model_dir, demo_data_dir,
                                                            tmp_path, monkeypatch, keep):
    """``train.keep_freed_memory`` (process-wide mallopt and heap trims, peftlab.runtime.heap):
    a library caller who wants glibc's defaults says false, and then fit never touches the
    allocator."""
    import peftlab.training.trainer as trainer_module

    calls: list[bool] = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(True) or True)
    trainer, _ = _trainer(tiny_chat_model_dir, demo_data_dir, tmp_path, max_steps=2,
                          keep_freed_memory=keep)
    trainer.fit()
    assert calls == ([True] if keep else [])
    # what is kept stays bounded: the trimmer watched the steps (measured its reference)
    assert (trainer.heap is not None and trainer.heap.reference is not None) == keep
