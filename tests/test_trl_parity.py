"""Loss parity with TRL, the reference implementation of GRPO, KTO, ORPO and SimPO.

TRL (a test-only dependency) computes these losses inside its trainers, not in free
functions, so each test builds the smallest TRL trainer offline on the tiny random Llama
and calls the method that turns a batch into the loss (``_compute_loss`` for GRPO and KTO,
``get_batch_loss_metrics`` for ORPO and SimPO/CPO). Both sides get:

* the same weights: a peft LoRA with random B on TRL's side, our LoRA loaded with the same
  tensors on ours (so policy != reference);
* the same batch: token ids built by our data pipeline, handed to TRL in its own batch
  layout (TRL's tokenization is not under test);
* the same reference: TRL switches the peft adapter off (KTO), we switch ours off; GRPO's
  reference and old log-probs arrive precomputed in TRL's inputs, so both sides are fed the
  same tensors, and the adapter-off log-probs themselves are compared separately.

Compared: the loss value and the gradient of every LoRA parameter, at assert_close's
default tolerances. GRPO's group-relative advantages are compared on completions TRL itself
sampled and rewarded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from peftlab.config import DataConfig
from peftlab.data.preference import build_preference_examples, pad_pairs
from peftlab.data.sft import encode_prompt
from peftlab.lab.demo_data import generate_demo_data
from peftlab.methods.lora import LoraConfig, apply_lora
from peftlab.methods.reference import reference_policy
from peftlab.models import load_model, load_tokenizer
from peftlab.tasks.grpo.loop import aggregate, group_advantages, grpo_token_losses
from peftlab.tasks.kto.config import KTOConfig
from peftlab.tasks.kto.data import build_kto_examples
from peftlab.tasks.kto.task import KTOTask
from peftlab.tasks.orpo.config import ORPOConfig
from peftlab.tasks.orpo.task import ORPOTask
from peftlab.tasks.ppo.loop import pack_rollouts, response_forward
from peftlab.tasks.simpo.config import SimPOConfig
from peftlab.tasks.simpo.task import SimPOTask

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
trl_cpo = pytest.importorskip("trl.experimental.cpo")
trl_orpo = pytest.importorskip("trl.experimental.orpo")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- models


def _peft_to_our_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def twin_models(model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, base): ours carries our LoRA; TRL wraps ``base`` with :func:`peft_config` (so
    its reference is the adapter switched off, as ours) and :func:`sync` copies its random
    adapter into ours."""
    base, _ = load_model(str(model_dir))
    ours = copy.deepcopy(base)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)  # peft draws the random A and B when TRL wraps the base
    return ours, base


def peft_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                           init_lora_weights=False)


def sync(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Our LoRA tensors := peft's (non-zero B, so the policy differs from the reference)."""
    state = {_peft_to_our_name(k): v for k, v in theirs.state_dict().items() if ".lora_" in k}
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert {k for k in ours.state_dict() if ".lora_" in k} == set(state)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_peft_to_our_name(n): p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad}


def assert_same_grads(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    mine, ref = lora_grads(ours), lora_grads(theirs)
    assert mine.keys() == ref.keys() and mine
    assert any(g.abs().sum() > 0 for g in ref.values())
    for name, grad in mine.items():
        assert_close(grad, ref[name], msg=name)


def _trl_args(cls, tmp_path: Path, **kwargs):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
               gradient_checkpointing=False, remove_unused_columns=False, **kwargs)


def _pairs_batch(tokenizer, n: int = 4) -> dict:
    rows = generate_demo_data(seed=0)["train"][:n]
    records = [{"prompt": r["instruction"], "chosen": r["output"],
                "rejected": "I do not know that, sorry." if i % 2 else "No."}
               for i, r in enumerate(rows)]
    examples, _ = build_preference_examples(records, tokenizer, DataConfig(), 256, "pairs")
    return pad_pairs(examples, tokenizer.pad_token_id)


def _trl_pair_batch(batch: dict) -> dict:
    """Our pad_pairs batch in TRL's CPO/ORPO layout (chosen_* and rejected_* rows)."""
    n = len(batch["ids"])
    out = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


# ----------------------------------------------------------------------------- SimPO, ORPO


@pytest.mark.parametrize("options", [
    {"beta": 2.0, "simpo_gamma": 1.0},
    {"beta": 2.5, "simpo_gamma": 0.5, "label_smoothing": 0.1, "cpo_alpha": 0.7},  # CPO-SimPO
], ids=["simpo", "cpo-simpo"])
def test_simpo_loss_and_gradients_equal_trl(options, tiny_chat_model_dir, tmp_path):
    ours, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    batch = _pairs_batch(tok)
    cfg = SimPOConfig(**options)
    args = _trl_args(trl_cpo.CPOConfig, tmp_path, loss_type="simpo", beta=cfg.beta,
                     simpo_gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing,
                     cpo_alpha=cfg.cpo_alpha)
    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = trl_cpo.CPOTrainer(model=theirs, args=args, train_dataset=data,
                                 processing_class=tok, peft_config=peft_config())
    theirs = trainer.model
    sync(ours, theirs)
    expected, _ = trainer.get_batch_loss_metrics(trainer.model, _trl_pair_batch(batch))
    expected.backward()

    total, n = SimPOTask(tok.pad_token_id, cfg).loss(ours, batch)
    (total / n).backward()
    assert_close(total / n, expected)
    assert_same_grads(ours, theirs)


def test_orpo_loss_and_gradients_equal_trl(tiny_chat_model_dir, tmp_path):
    """With ``nll_on_prompt: true`` (TRL's NLL over the whole chosen sequence)."""
    ours, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    batch = _pairs_batch(tok)
    data = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = trl_orpo.ORPOTrainer(model=theirs,
                                   args=_trl_args(trl_orpo.ORPOConfig, tmp_path, beta=0.3),
                                   train_dataset=data, processing_class=tok,
                                   peft_config=peft_config())
    theirs = trainer.model
    sync(ours, theirs)
    expected, metrics = trainer.get_batch_loss_metrics(trainer.model, _trl_pair_batch(batch))
    expected.backward()

    task = ORPOTask(tok.pad_token_id, ORPOConfig(beta=0.3, nll_on_prompt=True))
    total, n = task.loss(ours, batch)
    (total / n).backward()
    assert_close(total / n, expected)
    assert_same_grads(ours, theirs)
    # the logged terms agree too
    with torch.no_grad():
        terms = task.pair_terms(ours, batch)
    assert_close(float(terms["nll"]), metrics["nll_loss"], rtol=1e-5, atol=1e-6)
    assert_close(float(torch.nn.functional.logsigmoid(terms["log_odds"]).mean()),
                 metrics["log_odds_ratio"], rtol=1e-5, atol=1e-6)
    # our default puts the NLL on the answers only: a different (smaller-scope) number
    default = ORPOTask(tok.pad_token_id, ORPOConfig(beta=0.3)).pair_terms(ours, batch)
    assert abs(float(default["nll"]) - metrics["nll_loss"]) > 1e-3


# ----------------------------------------------------------------------------- KTO


def _kto_batch(tokenizer) -> tuple[KTOTask, dict, dict]:
    """Our batch, and TRL's built from the same token ids by TRL's own collator, with the
    mismatched KL answers paired by TRL's rule: (x_1, y_n), (x_2, y_1), ..., (x_n, y_n-1)."""
    rows = generate_demo_data(seed=0)["train"][:3]
    records = [{"prompt": r["instruction"], "completion": r["output"], "label": True}
               for r in rows]
    records += [{"prompt": rows[0]["instruction"], "completion": "No idea.", "label": False},
                {"prompt": rows[1]["instruction"], "completion": "Ask someone else.",
                 "label": False}]
    examples, _ = build_kto_examples(records, tokenizer, DataConfig(), 256, "unpaired")
    task = KTOTask(tokenizer.pad_token_id, KTOConfig(beta=0.2, desirable_weight=1.3,
                                                     undesirable_weight=0.8))
    completions = [ex["completion_ids"] for ex in examples]
    kl_completions = completions[-1:] + completions[:-1]
    theirs = trl_kto.DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["completion_ids"],
          "KL_completion_ids": kl, "label": ex["label"]}
         for ex, kl in zip(examples, kl_completions, strict=True)])
    return task, task.collate(examples), theirs


def test_kto_loss_and_gradients_equal_trl(tiny_chat_model_dir, tmp_path):
    ours, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    task, batch, trl_batch = _kto_batch(tok)
    data = datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                       {"prompt": "c", "completion": "d", "label": False}])
    args = _trl_args(trl.KTOConfig, tmp_path, beta=0.2, desirable_weight=1.3,
                     undesirable_weight=0.8, per_device_train_batch_size=2)
    trainer = trl.KTOTrainer(model=theirs, args=args, train_dataset=data,
                             processing_class=tok, peft_config=peft_config())
    assert trainer.calculate_KL and trainer.ref_model is None  # reference: adapter off
    theirs = trainer.model
    sync(ours, theirs)
    expected = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
    expected.backward()

    total, n = task.loss(ours, batch)
    (total / n).backward()
    assert_close(total / n, expected)
    assert_same_grads(ours, theirs)
    # premise: the reference point is not trivially zero here
    with torch.no_grad():
        assert float(task.terms(ours, batch)["kl"]) > 0


# ----------------------------------------------------------------------------- GRPO


def _grpo_rollouts(tokenizer):
    """4 prompts x 2 sampled-looking answers of unequal lengths (fixed ids, not sampled)."""
    rows = generate_demo_data(seed=0)["train"][:4]
    prompts = [encode_prompt([{"role": "user", "content": r["instruction"]}], tokenizer)
               for r in rows for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    answers = [torch.randint(3, len(tokenizer), (int(k),), generator=gen).tolist()
               for k in torch.randint(2, 7, (len(prompts),), generator=gen)]
    return prompts, answers


def _trl_grpo_inputs(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict:
    """TRL's layout: prompts left-padded, answers right-padded."""
    width, steps = max(map(len, prompts)), max(map(len, answers))
    prompt_ids = torch.full((len(prompts), width), pad_id)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_ids = torch.full((len(prompts), steps), pad_id)
    completion_mask = torch.zeros((len(prompts), steps), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        prompt_ids[i, width - len(p):] = torch.tensor(p)
        prompt_mask[i, width - len(p):] = 1
        completion_ids[i, :len(a)] = torch.tensor(a)
        completion_mask[i, :len(a)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


def _grpo_trainer(theirs, tok, tmp_path, **options):
    data = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    args = _trl_args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=8,
                     num_generations=2, max_completion_length=6, **options)
    def no_reward(completions, **kwargs):
        return [0.0] * len(completions)

    return trl.GRPOTrainer(model=theirs, reward_funcs=no_reward, args=args, train_dataset=data,
                           processing_class=tok, peft_config=peft_config())


@pytest.mark.parametrize(("loss_type", "bias_correction"), [
    ("grpo", True), ("bnpo", True), ("dr_grpo", True), ("dapo", True), ("dapo", False)])
def test_grpo_loss_and_gradients_equal_trl(loss_type, bias_correction, tiny_chat_model_dir,
                                           tmp_path):
    ours, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    temperature, beta, eps, eps_high = 0.7, 0.05, 0.2, 0.28
    trainer = _grpo_trainer(theirs, tok, tmp_path, loss_type=loss_type, beta=beta,
                            epsilon=eps, epsilon_high=eps_high, temperature=temperature,
                            use_bias_correction_kl=bias_correction)
    theirs = trainer.model
    sync(ours, theirs)
    prompts, answers = _grpo_rollouts(tok)
    rollouts = pack_rollouts(prompts, answers, tok.pad_token_id)
    mask = rollouts.mask
    with torch.no_grad():
        current, _, _ = response_forward(ours, rollouts, temperature)
        with reference_policy(ours):
            ref, _, _ = response_forward(ours, rollouts, temperature)
    gen = torch.Generator().manual_seed(1)
    # old log-probs away from the current ones, so both clip bounds are exercised
    old = (current + 0.4 * torch.randn(current.shape, generator=gen)) * mask
    advantages = torch.randn(len(prompts), generator=gen)
    inputs = {**_trl_grpo_inputs(prompts, answers, tok.pad_token_id), "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    trainer.model.eval()  # no accumulation normaliser (TRL's train mode divides by it)
    expected = trainer._compute_loss(trainer.model, inputs)
    expected.backward()

    logp, _, _ = response_forward(ours, rollouts, temperature)
    out = grpo_token_losses(logp, old, advantages, ref, beta, eps, eps_high, bias_correction)
    loss = aggregate(out["loss"], mask, loss_type, len(prompts), float(mask.sum()), 1, 6)
    loss.backward()
    assert float(out["clipped"][mask.bool()].float().mean()) > 0  # premise: clipping happens
    assert_close(loss, expected)
    assert_same_grads(ours, theirs)


def test_grpo_reference_logps_equal_trl_adapter_off(tiny_chat_model_dir, tmp_path):
    """Our adapter-off reference (and policy) log-probs equal TRL's on its peft model."""
    ours, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))
    trainer = _grpo_trainer(theirs, tok, tmp_path, temperature=0.7)
    theirs = trainer.model
    sync(ours, theirs)
    prompts, answers = _grpo_rollouts(tok)
    rollouts = pack_rollouts(prompts, answers, tok.pad_token_id)
    inputs = _trl_grpo_inputs(prompts, answers, tok.pad_token_id)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    steps = inputs["completion_ids"].shape[1]
    mask = rollouts.mask.bool()
    with torch.no_grad():
        their_pol, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn,
                                                                     steps)
        with trainer.model.disable_adapter():
            their_ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids,
                                                                         attn, steps)
        pol, _, _ = response_forward(ours.eval(), rollouts, 0.7)
        with reference_policy(ours):
            ref, _, _ = response_forward(ours, rollouts, 0.7)
    assert_close(pol[mask], their_pol[mask])
    assert_close(ref[mask], their_ref[mask])
    assert (pol - ref)[mask].abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trl(scale_rewards, tiny_chat_model_dir, tmp_path):
    """TRL samples and rewards the completions; our advantages from those rewards equal its."""
    _, theirs = twin_models(tiny_chat_model_dir)
    tok = load_tokenizer(str(tiny_chat_model_dir))

    def reward(completions, **kwargs):
        return [float(len(set(c)) % 4) for c in completions]

    data = datasets.Dataset.from_list([{"prompt": f"say {w}"} for w in ("hi", "yes", "no")])
    args = _trl_args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=12, num_generations=4,
                     max_completion_length=6, scale_rewards=scale_rewards, beta=0.0)
    trainer = trl.GRPOTrainer(model=theirs, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tok, peft_config=peft_config())
    torch.manual_seed(0)
    batch = [{"prompt": f"say {w}"} for w in ("hi", "yes", "no") for _ in range(4)]
    out = trainer._generate_and_score_completions(batch)
    texts = tok.batch_decode(out["completion_ids"] * out["completion_mask"],
                             skip_special_tokens=True)
    rewards = torch.tensor(reward(texts))
    assert rewards.view(3, 4).std(1).max() > 0  # premise: groups disagree
    mine, _ = group_advantages(rewards, 4, scale_rewards)
    assert_close(mine, out["advantages"])
