"""GRPO end to end on the tiny random Llama: from a YAML config through ``peftlab train``,
reward columns and several weighted sources, resume, the adapter saved and reloaded, errors.

As in test_ppo.py: at temperature 0.1 the tiny model's samples collapse onto one favourite
token; the reward "share of answer tokens that are not that token" starts low, and the
groups still disagree often enough to carry a signal GRPO must follow.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab.api import load
from peftlab.cli import main
from peftlab.config import ConfigError, from_dict
from peftlab.data.sft import encode_prompt
from peftlab.lab.demo_data import generate_demo_data
from peftlab.models import load_model, load_tokenizer
from peftlab.tasks import build_task
from peftlab.tasks.grpo.loop import GRPOTrainer
from peftlab.tasks.grpo.rewards import ColumnFunction
from peftlab.tasks.ppo.loop import sample_rollouts
from peftlab.training.recipe import run_training

MAX_NEW = 8


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _prompts(path: Path, n: int = 32, **columns) -> Path:
    rows = generate_demo_data(seed=0)["train"][:n]
    path.write_text("".join(json.dumps({"prompt": r["instruction"],
                                        **{k: v(i) for k, v in columns.items()}}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def _cfg(model_dir: Path, data: Path, out: Path, grpo: dict, **train) -> dict:
    return {"model": str(model_dir), "task": "grpo",
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "data": {"train": str(data)},
            "train": {"max_steps": 8, "batch_size": 16, "lr": 1e-2, "precision": "fp32",
                      "warmup_ratio": 0.0, "scheduler": "constant", "max_length": 128,
                      "num_threads": 1, **train},
            "grpo": {"num_generations": 4, "generation_batch_size": 16,
                     "max_completion_length": MAX_NEW, "temperature": 0.1, "beta": 0.02, **grpo},
            "output_dir": str(out)}


def _favourite_token(model_dir: Path, data: Path) -> str:
    model, tok = load_model(str(model_dir))
    model.eval()
    prompts = [encode_prompt([{"role": "user", "content": json.loads(x)["prompt"]}], tok)
               for x in data.read_text().splitlines()[:16]]
    torch.manual_seed(0)
    rollouts = sample_rollouts(model, tok, prompts, 0.1, 0, 1.0, MAX_NEW)
    counts = collections.Counter(rollouts.responses[rollouts.mask.bool()].tolist())
    stop = {tok.eos_token_id, tok.pad_token_id}
    return tok.decode([next(t for t, _ in counts.most_common() if t not in stop)])


def test_grpo_from_yaml_raises_a_verifiable_reward_and_reloads(tiny_chat_model_dir, tmp_path,
                                                                monkeypatch):
    data = _prompts(tmp_path / "prompts.jsonl")
    target = _favourite_token(tiny_chat_model_dir, data)
    (tmp_path / "grpo_toy_reward.py").write_text(
        f"TARGET = {target!r}\n\n"
        "def avoid_target(prompts, completions):\n"
        f"    return [1.0 - min(c.count(TARGET), {MAX_NEW}) / {MAX_NEW} for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    raw = _cfg(tiny_chat_model_dir, data, out,
               {"reward_function": "grpo_toy_reward:avoid_target"})
    raw["data"]["validation_split"] = 0.25
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config), "--no-progress"]) == 0

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    history = lines[1:]
    rewards = [r["reward_mean"] for r in history]
    assert lines[0]["step"] == 0 and "val_reward_mean" in lines[0]
    assert [r["step"] for r in history] == list(range(1, 9))
    assert rewards[0] < 0.5, f"premise: the base model mostly samples {target!r} ({rewards})"
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.4, rewards
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at first
    assert max(r["kl"] for r in history) > 0.01
    for key in ("reward_std", "reward/avoid_target", "frac_reward_zero_std", "entropy",
                "clip_ratio", "completion_length", "clipped_ratio", "loss", "lr"):
        assert key in history[-1], key
    assert history[-1]["val_reward_mean"] > lines[0]["val_reward_mean"]
    for name in ("reward.png", "adapter/adapter_model.safetensors", "report.md", "config.yaml"):
        assert (out / name).is_file(), name
    # the saved adapter reloads into the policy that was trained: its greedy validation
    # answers score what the run logged last
    cfg = from_dict(raw)
    prepared = build_task(cfg, load_tokenizer(cfg.model))
    model, tok = load(cfg.model, adapter=out / "adapter")
    trainer = GRPOTrainer(model, tok, prepared.train, prepared.validation, cfg, tmp_path / "x",
                          [ColumnFunction("grpo_toy_reward:avoid_target")], progress=False)
    assert trainer.evaluate()["val_reward_mean"] == pytest.approx(history[-1]["val_reward_mean"])


def test_reward_functions_get_the_rows_columns_and_weights(tiny_chat_model_dir, tmp_path,
                                                           monkeypatch):
    """``answer`` reaches the function aligned with each prompt's answers; two sources are
    summed with their weights; equal rewards within every group give zero advantages."""
    data = _prompts(tmp_path / "p.jsonl", n=8, answer=lambda i: i, other=lambda i: f"x{i}")
    (tmp_path / "grpo_column_reward.py").write_text(
        "SEEN = []\n\n"
        "def the_answer(prompts, completions, answer):\n"
        "    SEEN.append((list(prompts), list(answer)))\n"
        "    return [float(a) for a in answer]\n\n"
        "def everything(prompts, completions, **columns):\n"
        "    SEEN.append(sorted(columns))\n"
        "    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import grpo_column_reward as mod

    grpo = {"reward_function": ["grpo_column_reward:the_answer", "grpo_column_reward:everything"],
            "reward_weights": [0.5, 2.0], "generation_batch_size": 8}
    summary = run_training(from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", grpo,
                                          max_steps=2, batch_size=8)), progress=False)
    rows = {json.loads(x)["prompt"]: json.loads(x)["answer"]
            for x in data.read_text().splitlines()}
    prompts, answers = mod.SEEN[0]
    assert len(prompts) == 8 and answers == [rows[p] for p in prompts]  # aligned, 4 per prompt
    assert prompts[0] == prompts[3] and prompts[4] == prompts[7]
    assert mod.SEEN[1] == ["answer", "other"]  # every column but the prompt
    first = summary.result.history[0]
    assert first["reward_mean"] == pytest.approx(0.5 * sum(answers) / 8 + 2.0)
    assert first["reward/the_answer"] == pytest.approx(sum(answers) / 8)
    assert first["reward/everything"] == 1.0
    assert first["frac_reward_zero_std"] == 1.0 and first["loss"] == pytest.approx(0.0, abs=1e-6)


def test_resume_continues_to_the_same_result(tiny_chat_model_dir, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, a crash, and a resume from the step-2 checkpoint (sampling
    at temperature 1, two optimizer steps and two passes per round, old log-probs, validation,
    6 prompts drawn 2 at a time across the checkpoint)."""
    data = _prompts(tmp_path / "p.jsonl", n=8)
    (tmp_path / "grpo_resume_reward.py").write_text(
        "def longer(prompts, completions):\n"
        "    return [len(c) / 40 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    grpo = {"reward_function": "grpo_resume_reward:longer", "generation_batch_size": 8,
            "temperature": 1.0, "steps_per_generation": 2, "num_iterations": 2,
            "loss_type": "grpo"}
    cfg = _cfg(tiny_chat_model_dir, data, out, grpo, max_steps=8, batch_size=4, save_every=4,
               eval_every=4)
    cfg["data"]["validation_split"] = 0.25  # 6 training prompts, 2 validation prompts

    straight = run_training(from_dict(cfg), progress=False).result.history
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-0000004", "step-0000008"]
    state = json.loads((ckpt_dir / "step-0000004" / "trainer_state.json").read_text())
    assert (state["task"], state["round"], state["step"]) == ("grpo", 1, 4)
    for name in ("step-0000008", "adapter", "reward.png"):
        path = (ckpt_dir if name.startswith("step") else out) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (ckpt_dir / "step-0000006.tmp").mkdir()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "rew')

    resumed = run_training(from_dict(cfg), resume=True, progress=False).result.history
    assert _without_time(resumed) == _without_time(straight)
    assert [r["step"] for r in resumed] == [4, 8]
    adapter2 = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key in adapter:
        torch.testing.assert_close(adapter2[key], adapter[key], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 4, 8]


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_grpo_configuration_errors(tiny_chat_model_dir, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", n=4)
    tok = load_tokenizer(str(tiny_chat_model_dir))

    def build(grpo: dict, **train):
        return build_task(from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", grpo,
                                         **train)), tok)

    with pytest.raises(ConfigError, match="grpo: no reward"):
        build({})
    with pytest.raises(ConfigError, match="grpo.reward_function: cannot import"):
        build({"reward_function": "no_such_module_xyz:f"})
    with pytest.raises(ConfigError, match="grpo.reward_weights: 2 weights for 1"):
        build({"reward_function": "math:fsum", "reward_weights": [1, 2]})
    with pytest.raises(ConfigError, match="train.grad_accum"):
        build({"reward_function": "math:fsum"}, grad_accum=2)
    with pytest.raises(ConfigError, match="max_completion_length"):
        build({"reward_function": "math:fsum", "max_completion_length": 200})
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        from_dict({"model": "x", "grpo": {"num_generations": 3, "generation_batch_size": 8}})
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        from_dict({"model": "x", "grpo": {"num_generations": 1, "generation_batch_size": 8}})
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        from_dict({"model": "x", "grpo": {"loss_type": "ppo"}})
    raw = _cfg(tiny_chat_model_dir, data, tmp_path / "o", {"reward_function": "math:fsum"})
    raw["method"] = {"name": "full"}
    with pytest.raises(ConfigError, match="task: grpo with grpo.beta > 0: .*'full' cannot"):
        build_task(from_dict(raw), tok)
    raw["grpo"]["beta"] = 0.0  # no reference, so any method
    assert build_task(from_dict(raw), tok).train
    bad = ColumnFunction(lambda prompts, completions: [1.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        bad([[{"role": "user", "content": "a"}]] * 2, ["x", "y"], {})


def test_arithmetic_problems_and_their_reward(tiny_chat_model_dir, tmp_path):
    """The verifiable task of the real-data benchmark: answers right by construction, the
    reward by hand, and the shipped config builds on the written data."""
    import re

    from peftlab.config import load_config
    from peftlab.lab.arithmetic import exact_answer, generate_problems, write_arithmetic_data

    rows = generate_problems(60, seed=3)
    assert rows == generate_problems(60, seed=3) and len({r["prompt"] for r in rows}) == 60
    for row in rows:
        a, b = map(int, re.findall(r"\d+", row["prompt"])[:2])
        assert row["answer"] == {"add": a + b, "sub": a - b, "mul": a * b}[row["kind"]], row
    assert exact_answer(["q"] * 4, ["It is 12.", "12 - 3 = 9", "1,200 apples", "none"],
                        answer=[12, 12, 1200, 0]) == [1.0, 0.0, 1.0, 0.0]
    paths = write_arithmetic_data(tmp_path / "arith", n_train=20, n_validation=5)
    train = [json.loads(x)["prompt"] for x in paths["train"].read_text().splitlines()]
    val = [json.loads(x)["prompt"] for x in paths["validation"].read_text().splitlines()]
    assert len(train) == 20 and len(val) == 5 and not set(train) & set(val)
    shipped = Path(__file__).resolve().parents[1] / "configs" / "grpo_arithmetic.yaml"
    cfg = load_config(shipped, [f"data.train={paths['train']}",
                                f"data.validation={paths['validation']}"])
    prepared = build_task(cfg, load_tokenizer(str(tiny_chat_model_dir)))
    assert len(prepared.train) == 20 and "answer" in prepared.train[0]["row"]


def test_a_classifier_reward_is_weighted_after_the_functions(tiny_chat_model_dir, tmp_path,
                                                             monkeypatch):
    texts = tmp_path / "sentiment.jsonl"
    rows = [("great and lovely", "pos"), ("awful and bad", "neg")] * 4
    texts.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    run_training(from_dict({
        "model": str(tiny_chat_model_dir), "task": "classification",
        "method": {"name": "lora", "r": 4, "alpha": 8}, "data": {"train": str(texts)},
        "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "num_threads": 1},
        "output_dir": str(tmp_path / "clf")}), progress=False)
    (tmp_path / "grpo_one_reward.py").write_text(
        "def one(prompts, completions):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _prompts(tmp_path / "p.jsonl", n=4)
    grpo = {"reward_function": "grpo_one_reward:one", "reward_classifier": str(tmp_path / "clf"),
            "reward_label": "pos", "reward_weights": [1.0, 0.5], "generation_batch_size": 8}
    first = run_training(from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", grpo,
                                        max_steps=1, batch_size=8)),
                         progress=False).result.history[0]
    assert 0.0 < first["reward/classifier"] < 1.0
    assert first["reward_mean"] == pytest.approx(1.0 + 0.5 * first["reward/classifier"])
