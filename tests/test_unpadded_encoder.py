"""BERT-family classifier logits computed on real tokens and the last layer's [CLS] only
(peftlab.models.unpadded_encoder) equal the model's own forward, and gradients too."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from peftlab.config import TrainConfig
from peftlab.methods.lora import LoraConfig, apply_lora
from peftlab.models.unpadded_encoder import (
    computes_real_tokens_only,
    encoder_class_logits,
    encoder_mean_states,
)
from peftlab.runtime.cpu_attention import cpu_attention
from peftlab.tasks.classification.task import ClassificationTask
from peftlab.tasks.reward.task import sequence_scores
from peftlab.training.compile import resolve_compile

SHAPE = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40, num_labels=3,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _model(kind: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(**SHAPE, type_vocab_size=2))
    else:  # RoBERTa: positions count from padding_idx + 1, its head reads features[:, 0]
        model = RobertaForSequenceClassification(RobertaConfig(**SHAPE, pad_token_id=1))
    model.config._attn_implementation = attn
    return model.eval()


def _inputs(padding: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    lengths, width = [9, 4, 7, 1], 9
    ids = torch.randint(3, 60, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if padding == "left":
            mask[i, width - n:] = 1
        else:
            mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)  # RoBERTa's padding id
    types = (torch.arange(width) >= 5).long().expand_as(ids) * mask
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if padding == "none":
        inputs = {"input_ids": ids}
    return inputs


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("padding", ["right", "left", "none"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_the_models_forward(kind: str, padding: str, attn: str):
    model, inputs = _model(kind, attn), _inputs(padding)
    if kind == "roberta":
        inputs.pop("token_type_ids", None)
    with torch.no_grad():
        assert_close(encoder_class_logits(model, inputs), model(**inputs).logits)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_gradients_equal_the_models_forward_with_lora_and_peftlabs_attention(kind: str):
    """Training: LoRA on query/value plus a trainable head, inside the attention the Trainer
    registers on a CPU; same loss, same gradient for every trainable parameter."""
    model, inputs = _model(kind), _inputs("right")
    inputs.pop("token_type_ids")
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"], init="random"))
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    model.train()
    labels = torch.tensor([0, 2, 1, 2])
    grads = []
    for ours in (False, True):
        with cpu_attention(model):
            logits = encoder_class_logits(model, inputs) if ours else model(**inputs).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert len(grads[0]) > 4 and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], msg=name)


def test_rows_computed_are_the_real_tokens_then_the_first_position():
    """What makes it cheaper: the feed-forward block of an early layer sees the real tokens
    (plus position 0 where it is padding), the last layer's only the first positions."""
    model, inputs = _model("bert"), _inputs("left")
    seen: dict[str, int] = {}
    for name, i in (("early", 0), ("last", -1)):
        dense = model.bert.encoder.layer[i].intermediate.dense
        dense.register_forward_hook(lambda m, args, out, name=name:
                                    seen.__setitem__(name, args[0].reshape(-1, 32).shape[0]))
    with torch.no_grad():
        encoder_class_logits(model, inputs)
    real = int(inputs["attention_mask"].sum())
    assert seen == {"early": real + 3, "last": 4}  # 3 left-padded rows keep their position 0


def test_declines_where_the_forward_is_changed_or_unknown():
    model, inputs = _model("bert"), _inputs("right")
    handle = model.bert.register_forward_pre_hook(lambda m, args: None)  # as prompt tuning
    assert encoder_class_logits(model, inputs) is None
    handle.remove()
    model.bert.encoder.layer[1].compile()  # compiled blocks (train.compile) are not bypassed
    assert encoder_class_logits(model, inputs) is None
    distil = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    assert encoder_class_logits(distil, inputs) is None


def test_the_classification_task_reads_its_logits_from_here():
    model, inputs = _model("bert"), _inputs("right")
    task = ClassificationTask({"labels": ["a", "b", "c"]}, pad_id=1)
    calls = []
    model.bert.encoder.layer[-1].output.dense.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        logits = task.logits(model, {**inputs, "labels": torch.tensor([0, 1, 2, 0])})
        assert_close(logits, model(**inputs).logits)
    assert calls[0][0] == 4  # the last layer ran for 4 rows: this path, not the full forward


def test_logits_under_bf16_autocast_match_the_models_forward():
    """``precision: bf16`` runs the task under CPU autocast: the packed rows and the scattered
    heads take the dtypes the model's own layers produce (bf16 matmuls, fp32 layer norms)."""
    model, inputs = _model("bert"), _inputs("right")
    torch.nn.init.normal_(model.classifier.weight, std=3.0)  # logits ~1, not ~0.01
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = encoder_class_logits(model, inputs), model(**inputs).logits
    assert ours.dtype == theirs.dtype and theirs.abs().max() > 0.5
    assert_close(ours, theirs)  # bf16 tolerances


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_mean_states_equal_the_masked_mean_of_the_backbones_states(kind: str, padding: str):
    """``classification.pooling: mean`` reads the mean over attended tokens, computed here
    from the real tokens alone; the task's pooled logits equal the full forward's."""
    model, inputs = _model(kind), _inputs(padding)
    inputs.pop("token_type_ids")
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state
        assert_close(encoder_mean_states(model, inputs), (hidden * mask).sum(1) / mask.sum(1))
    if kind == "bert":  # the task's mean pooling needs a linear head (BERT's classifier)
        task = ClassificationTask({"labels": ["a", "b", "c"], "pooling": "mean"}, pad_id=1)
        with torch.no_grad():
            ours = task.logits(model, {**inputs, "labels": torch.tensor([0, 1, 2, 0])})
        assert_close(ours, model.classifier((hidden * mask).sum(1) / mask.sum(1)))


def test_checkpointed_layers_recompute_and_give_the_same_gradients():
    """``train.activation_checkpointing``: the layers run again in backward, as the model's
    own checkpointed layers would, and the gradients are unchanged."""
    model, inputs = _model("bert"), _inputs("right")
    model.train()
    labels = torch.tensor([0, 2, 1, 2])
    calls = []
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda m, args, out: calls.append(1))
    grads = []
    for checkpointed in (False, True):
        if checkpointed:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        calls.clear()
        logits = encoder_class_logits(model, inputs)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        assert len(calls) == (2 if checkpointed else 1)  # recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], msg=name)


def test_reward_scores_of_an_encoder_come_from_the_real_tokens():
    model, inputs = _model("roberta"), _inputs("right")
    calls = []
    model.roberta.encoder.layer[-1].output.dense.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
        assert calls == [4]  # the last layer ran for the 4 first positions only
        assert_close(scores, model(input_ids=inputs["input_ids"],
                                   attention_mask=inputs["attention_mask"]).logits)


def test_compile_auto_stays_off_for_a_classifier_computed_on_real_tokens():
    """Compiled blocks would bypass this path and compute the padding again."""
    model = _model("bert")
    assert computes_real_tokens_only(model)
    on, why = resolve_compile(TrainConfig(precision="fp32"), model, 500)
    assert on is False and "real tokens only" in why
    assert not computes_real_tokens_only(DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64)))
