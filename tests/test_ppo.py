"""PPO end to end on the tiny random Llama, and its reward sources.

The tiny model's logits span only about +-1.3 nats (random 0.02-scale embeddings behind a
final RMSNorm), so at temperature 1 no reward can move it far. At temperature 0.1 its
samples collapse onto one favourite token; the reward "fraction of answer tokens that are
not that token" starts low and PPO must raise it.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftlab.config import ConfigError, from_dict
from peftlab.data.sft import encode_prompt
from peftlab.lab.demo_data import generate_demo_data
from peftlab.models import load_model
from peftlab.tasks import build_task
from peftlab.tasks.ppo.config import PPOConfig
from peftlab.tasks.ppo.loop import generate_rollouts
from peftlab.tasks.ppo.rewards import ClassifierScorer, FunctionScorer, check_reward_config
from peftlab.training.recipe import run_training

MAX_NEW = 8


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs use train.num_threads=1 (tiny ops: extra threads only add contention on a shared
    CPU, ~10x slower under load); the recipe sets it process-wide, so put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _prompts(path: Path, n: int = 32) -> Path:
    rows = generate_demo_data(seed=0)["train"][:n]
    path.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in rows))
    return path


def _cfg(model_dir: Path, data: Path, out: Path, ppo: dict, **train) -> dict:
    return {"model": str(model_dir), "task": "ppo", "method": {"name": "lora", "r": 8, "alpha": 16},
            "data": {"train": str(data)},
            "train": {"lr": 2e-3, "precision": "fp32", "warmup_ratio": 0.0,
                      "scheduler": "constant", "max_length": 128, "num_threads": 1, **train},
            "ppo": {"iterations": 20, "rollout_batch_size": 16, "minibatch_size": 8,
                    "ppo_epochs": 2, "max_new_tokens": MAX_NEW, "temperature": 0.1,
                    "kl_coef": 0.02, **ppo},
            "output_dir": str(out)}


def _favourite_token(model_dir: Path, data: Path) -> str:
    """The text of the token the base model samples most at temperature 0.1."""
    model, tok = load_model(str(model_dir))
    model.eval()
    prompts = [encode_prompt([{"role": "user", "content": json.loads(x)["prompt"]}], tok)
               for x in data.read_text().splitlines()[:16]]
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tok, prompts, PPOConfig(temperature=0.1,
                                                                max_new_tokens=MAX_NEW))
    counts = collections.Counter(rollouts.responses[rollouts.mask.bool()].tolist())
    stop = {tok.eos_token_id, tok.pad_token_id}
    token = next(t for t, _ in counts.most_common() if t not in stop)
    return tok.decode([token])


def test_ppo_raises_a_verifiable_reward(tiny_chat_model_dir, tmp_path, monkeypatch):
    data = _prompts(tmp_path / "prompts.jsonl")
    target = _favourite_token(tiny_chat_model_dir, data)
    (tmp_path / "toy_reward.py").write_text(
        f"TARGET = {target!r}\n\n"
        "def avoid_target(prompts, responses):\n"
        f"    return [1.0 - min(r.count(TARGET), {MAX_NEW}) / {MAX_NEW} for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, out,
                         {"reward_function": "toy_reward:avoid_target"}))
    summary = run_training(cfg, progress=False)

    history = summary.result.history
    rewards = [r["reward_mean"] for r in history]
    assert len(history) == 20
    assert rewards[0] < 0.5, f"premise: the base model mostly samples {target!r} ({rewards})"
    assert sum(rewards[-5:]) / 5 > rewards[0] + 0.3, rewards
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at first
    assert max(r["kl"] for r in history) > 0.1  # ... and drifts away from it while learning
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    for key in ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction",
                "approx_kl", "policy_loss", "value_loss", "response_length"):
        assert key in lines[-1], key
    for name in ("reward.png", "value_head.safetensors", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "report.md"):
        assert (out / name).is_file(), name
    head = load_file(str(out / "value_head.safetensors"))
    assert head["value_head.linear.weight"].shape == (1, 64)
    assert head["value_head.linear.weight"].abs().sum() > 0  # the value head trained


def test_ppo_with_a_reward_model_and_adaptive_kl(tiny_chat_model_dir, tmp_path):
    rows = generate_demo_data(seed=0)["train"][:8]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["output"],
                                         "rejected": "no"}) + "\n" for r in rows))
    rm_cfg = {"model": str(tiny_chat_model_dir), "task": "reward",
              "method": {"name": "lora", "r": 4, "alpha": 8}, "data": {"train": str(pairs)},
              "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "num_threads": 1},
              "output_dir": str(tmp_path / "rm")}
    run_training(from_dict(rm_cfg), progress=False)

    ppo = {"reward_model": str(tmp_path / "rm"), "iterations": 2, "rollout_batch_size": 4,
           "minibatch_size": 2, "ppo_epochs": 1, "temperature": 1.0, "adaptive_kl": True,
           "kl_coef": 0.1, "target_kl": 0.01, "kl_horizon": 10, "kl_estimator": "k3",
           "whiten_rewards": True}
    cfg = from_dict(_cfg(tiny_chat_model_dir, pairs, tmp_path / "ppo", ppo, eval_every=1)
                    | {"data": {"train": str(pairs), "validation_split": 0.25}})
    summary = run_training(cfg, progress=False)
    history = summary.result.history
    assert len(history) == 2 and all("val_reward_mean" in r for r in history)
    # iteration 1: policy == reference, KL 0 < target, so the coefficient shrinks by
    # (1 + clip(0 / 0.01 - 1, -0.2, 0.2) * 4 / 10) = 0.92
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["kl_coef"] == pytest.approx(0.1)
    assert history[1]["kl_coef"] == pytest.approx(0.1 * 0.92)
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()


def test_ppo_with_a_classifier_reward(tiny_chat_model_dir, tmp_path):
    data = tmp_path / "sentiment.jsonl"
    texts = [("great and lovely", "pos"), ("awful and bad", "neg")] * 4
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in texts))
    clf_cfg = {"model": str(tiny_chat_model_dir), "task": "classification",
               "method": {"name": "lora", "r": 4, "alpha": 8}, "data": {"train": str(data)},
               "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "num_threads": 1},
               "output_dir": str(tmp_path / "clf")}
    run_training(from_dict(clf_cfg), progress=False)
    scorer = ClassifierScorer(tmp_path / "clf", "pos")
    scores = scorer([[{"role": "user", "content": "hi"}]] * 2, ["great", "awful"])
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    with pytest.raises(ConfigError, match="ppo.reward_label: 'neutral' is not a label"):
        ClassifierScorer(tmp_path / "clf", "neutral")

    prompts = _prompts(tmp_path / "prompts.jsonl", n=4)
    ppo = {"reward_classifier": str(tmp_path / "clf" / "adapter"), "reward_label": "pos",
           "iterations": 1, "rollout_batch_size": 4, "minibatch_size": 4, "ppo_epochs": 1}
    summary = run_training(from_dict(_cfg(tiny_chat_model_dir, prompts, tmp_path / "ppo", ppo)),
                           progress=False)
    assert 0.0 < summary.result.history[0]["reward_mean"] < 1.0


def test_resume_continues_to_the_same_result(tiny_chat_model_dir, tmp_path, monkeypatch,
                                             capsys):
    """4 iterations straight == 2 iterations, a crash, and a resume from the step-2 checkpoint.

    Sampling at temperature 1 (torch RNG), an adaptive KL coefficient, validation rollouts and
    6 prompts drawn 4 at a time (the shuffled pass straddles the checkpoint) make the result
    depend on every piece of restored state.
    """
    data = _prompts(tmp_path / "prompts.jsonl", n=8)
    (tmp_path / "ppo_resume_reward.py").write_text(  # CALLS: how many answers each call scored
        "CALLS = []\n"
        "def longer(prompts, responses):\n"
        "    CALLS.append(len(responses))\n"
        "    return [len(r) / 40 for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    ppo = {"reward_function": "ppo_resume_reward:longer", "iterations": 4,
           "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "temperature": 1.0,
           "adaptive_kl": True, "kl_coef": 0.1, "target_kl": 0.01, "kl_horizon": 10}
    cfg = _cfg(tiny_chat_model_dir, data, out, ppo, save_every=2, eval_every=3)
    cfg["data"]["validation_split"] = 0.25  # 6 training prompts, 2 validation prompts

    straight = run_training(from_dict(cfg), progress=False).result.history
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    head = load_file(str(out / "value_head.safetensors"))
    ckpt_dir = out / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step-0000002", "step-0000004"]
    step2 = ckpt_dir / "step-0000002"
    assert sorted(p.name for p in step2.iterdir()) == [
        "optimizer.safetensors", "trainable.safetensors", "trainer_state.json"]
    weights = load_file(str(step2 / "trainable.safetensors"))
    assert "value_head.linear.weight" in weights
    assert any(k.startswith("policy.") and "lora_A" in k for k in weights)
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["iteration"] == 2 and [r["step"] for r in state["history"]] == [1, 2]
    last = state["history"][-1]  # the coefficient after iteration 2's update (see KLController)
    error = min(max(last["kl"] / 0.01 - 1, -0.2), 0.2)
    assert state["kl_coef"] == pytest.approx(last["kl_coef"] * (1 + error * 4 / 10), rel=1e-3)
    assert state["kl_coef"] != pytest.approx(0.1)
    assert len(state["prompt_order"]) == 4  # 8 drawn: a pass of 6, then 2 of the next

    # a crash after iteration 2: no later checkpoint, no outputs, a half-written checkpoint
    # and a half-written metrics line
    for name in ("step-0000004", "adapter", "value_head.safetensors", "reward.png"):
        path = (ckpt_dir if name.startswith("step") else out) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (ckpt_dir / "step-0000003.tmp").mkdir()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')

    # copies of the crashed run with one part of the checkpoint perturbed (see the end)
    for what in ("weights", "kl_coef"):
        shutil.copytree(out, tmp_path / f"run-{what}")
        step2_copy = tmp_path / f"run-{what}" / "checkpoints" / "step-0000002"
        if what == "weights":
            path = step2_copy / "trainable.safetensors"
            save_file({k: v * 1.5 if "lora_B" in k else v
                       for k, v in load_file(str(path)).items()}, str(path))
        else:
            path = step2_copy / "trainer_state.json"
            path.write_text(json.dumps(dict(json.loads(path.read_text()), kl_coef=1.0)))

    calls = sys.modules["ppo_resume_reward"].CALLS
    calls.clear()
    capsys.readouterr()
    resumed = run_training(from_dict(cfg), resume=True, progress=False).result.history
    assert f"resumed from {step2} at iteration 2" in capsys.readouterr().out
    # the resumed run rolled out iterations 3 and 4 only (4 answers each), plus the
    # validation rollouts at iterations 3 and 4 (2 answers each); from scratch it would be
    # 4 training rollouts and 3 validations
    assert calls == [4, 2, 4, 2]
    assert _without_time(resumed) == _without_time(straight)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    adapter2 = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    head2 = load_file(str(out / "value_head.safetensors"))
    assert adapter.keys() == adapter2.keys() and head.keys() == head2.keys()
    for key in adapter:
        torch.testing.assert_close(adapter2[key], adapter[key], rtol=0, atol=1e-6)
    for key in head:
        torch.testing.assert_close(head2[key], head[key], rtol=0, atol=1e-6)
    assert head["value_head.linear.weight"].abs().sum() > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4]  # step 0: the initial validation
    assert _without_time(lines[1:]) == _without_time(straight)
    assert (out / "reward.png").is_file()

    # The checkpoint is really used: resuming from a perturbed one ends elsewhere. Two Adam
    # steps at lr 2e-3 move each weight by up to ~4e-3, 4000 x the tolerance above.
    for what in ("weights", "kl_coef"):
        cfg_other = dict(cfg, output_dir=str(tmp_path / f"run-{what}"))
        run_training(from_dict(cfg_other), resume=True, progress=False)
        other = load_file(str(tmp_path / f"run-{what}" / "adapter" / "adapter_model.safetensors"))
        diff = max(float((other[k] - adapter[k]).abs().max()) for k in adapter)
        assert diff > 1e-4, what


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_resume_without_a_checkpoint_names_the_directory(tiny_chat_model_dir, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", n=2)
    out = tmp_path / "fresh"
    ppo = {"reward_function": "math:fsum", "iterations": 1, "rollout_batch_size": 2}
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, out, ppo))
    with pytest.raises(FileNotFoundError, match=re.escape(str(out / "checkpoints"))):
        run_training(cfg, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="not a peftlab checkpoint"):
        run_training(cfg, resume=str(tmp_path), progress=False)


def test_reward_source_configuration_errors(tiny_chat_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of"):
        check_reward_config(PPOConfig())
    with pytest.raises(ConfigError, match="exactly one of"):
        check_reward_config(PPOConfig(reward_function="math:sqrt", reward_model=str(tmp_path)))
    with pytest.raises(ConfigError, match="ppo.reward_function: cannot import"):
        check_reward_config(PPOConfig(reward_function="no_such_module_xyz:f"))
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        check_reward_config(PPOConfig(reward_function="math:nope"))
    with pytest.raises(ConfigError, match="ppo.reward_model: .*no adapter_config.json"):
        check_reward_config(PPOConfig(reward_model=str(tmp_path)))
    with pytest.raises(ConfigError, match="ppo.reward_label: required"):
        check_reward_config(PPOConfig(reward_classifier=str(tmp_path)))
    with pytest.raises(ConfigError, match="ppo.kl_estimator"):
        from_dict({"model": "x", "ppo": {"kl_estimator": "k2"}})
    # the task is checked before any model is loaded
    data = _prompts(tmp_path / "p.jsonl", n=2)
    cfg = from_dict(_cfg(tiny_chat_model_dir, data, tmp_path / "o", {}))
    with pytest.raises(ConfigError, match="exactly one of"):
        build_task(cfg, None)
    # a function returning the wrong number of rewards is named in the error
    bad = FunctionScorer(lambda prompts, responses: [1.0])
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        bad([[{"role": "user", "content": "a"}]] * 2, ["x", "y"])
