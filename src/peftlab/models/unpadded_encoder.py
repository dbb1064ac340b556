"""Class logits of a BERT-family sequence classifier computed on the rows the logits depend on:
the real tokens, and in the last layer the first position ([CLS] / ``<s>``) alone.

Why: transformers computes every position of a padded batch, padding included, and every
position of the last layer although BERT's pooler and RoBERTa's classification head read
``hidden[:, 0]`` and nothing else. Padding positions are never attended to (the mask hides
them as keys), so their rows cannot change a real token's; and in the last layer the other
positions are needed only as keys and values. Here the linear layers, layer norms and
feed-forward blocks run on the packed real tokens ``(N, d)``; only attention sees the padded
``(B, H, S, D)`` layout, scattered in and gathered out. SST-2 batches padded to the longest
sentence are about two-thirds padding; the last layer alone was ~14% of MiniLM-L6's matmul
FLOPs at 64 tokens. Classification (``pooling: model`` and ``mean``) and reward scores, in
training, validation and prediction, go through here.

The results are the model's own: embeddings, masks (as the model builds them), the attention
function the config names (or the one peftlab's CPU training registers), the layers'
sub-modules and the head are called as the model's forward calls them; only each layer's
``forward`` (the order of those calls) is spelled out, as transformers writes it for BERT,
and checkpointed where the model checkpoints its layers. Anything that changes the forward
from outside makes these functions decline (None) and the caller runs the model's forward:
hooks on the model, the backbone or a layer (prompt and prefix tuning, FSDP), compiled
layers, a wrapper (DDP), a class not listed in :data:`HEADS`. Dropout draws differ from the
full forward's (fewer rows are dropped out), so a training run is equal in distribution, not
bit for bit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

# Sequence classifiers whose head reads hidden[:, 0] only -> the class of their backbone.
# Each is checked against the model's forward in tests/test_unpadded_encoder.py.
HEADS = {
    "BertForSequenceClassification": "BertModel",
    "RobertaForSequenceClassification": "RobertaModel",
}
# Backbones with BERT's layer structure: attention.self.{query,key,value}, attention.output,
# feed_forward_chunk.
_SELF_ATTENTION = {"BertSelfAttention", "RobertaSelfAttention"}


def computes_real_tokens_only(model: nn.Module) -> bool:
    """Whether this model's class logits come from :func:`encoder_class_logits` (so compiled
    blocks, which it does not call, would give the padding back)."""
    return type(model).__name__ in HEADS and _backbone(model) is not None


def encoder_class_logits(model: nn.Module, inputs: dict[str, Any]) -> Tensor | None:
    """``model(**inputs).logits`` for a supported classifier, computed on the real tokens
    and the last layer's first position only; None when this path does not apply (call the
    model's forward).

    ``inputs``: ``input_ids`` and optionally ``attention_mask`` (1 = attend; right or left
    padding) and ``token_type_ids``, as the model's forward takes them."""
    if not computes_real_tokens_only(model):
        return None
    backbone = model.base_model
    cls = _encode(backbone, inputs, first_only=True).unsqueeze(1)  # (B, 1, d): heads read [:, 0]
    if type(model).__name__ == "BertForSequenceClassification":
        return model.classifier(model.dropout(backbone.pooler(cls)))
    return model.classifier(cls)  # RoBERTa's head reads features[:, 0] itself


def encoder_mean_states(model: nn.Module, inputs: dict[str, Any]) -> Tensor | None:
    """The mean of the backbone's last hidden states over the attended tokens, ``(B, d)``
    (``classification.pooling: mean``), from the real tokens only; None when this path does
    not apply. A row with no attended token gets zeros."""
    backbone = _backbone(model)
    if backbone is None:
        return None
    hidden = _encode(backbone, inputs, first_only=False)
    keep = _attended(inputs)
    sequence = keep.nonzero()[:, 0]  # the sequence of each packed row
    sums = hidden.new_zeros(keep.shape[0], hidden.shape[-1]).index_add_(0, sequence, hidden)
    return sums / keep.sum(dim=1, keepdim=True).clamp(min=1).to(sums.dtype)


def _attended(inputs: dict[str, Any]) -> Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask != 0


def _encode(backbone: nn.Module, inputs: dict[str, Any], first_only: bool) -> Tensor:
    """The last layer's output at position 0 of each row, ``(B, d)``, or at every attended
    token, packed ``(N, d)`` in row-major order; the layers compute the attended tokens only."""
    from transformers.masking_utils import create_bidirectional_mask  # lazy: light imports

    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    embedded = backbone.embeddings(input_ids=input_ids, token_type_ids=inputs.get("token_type_ids"))
    mask = create_bidirectional_mask(config=backbone.config, inputs_embeds=embedded,
                                     attention_mask=inputs.get("attention_mask"))
    keep = _attended(inputs)
    if first_only:  # position 0 even where it is padding (left padding): the head reads it,
        keep[:, 0] = True  # and the model computes it as a query like any other
    rows = keep.flatten().nonzero().squeeze(1)
    layout = _Layout(rows, batch, length, _attention_function(backbone.config, backbone))
    hidden = embedded.reshape(batch * length, -1).index_select(0, rows)
    *layers, last = backbone.encoder.layer
    for layer in layers:
        hidden = _checkpointed(layer, hidden, hidden, mask, layout)
    queries = hidden
    if first_only:
        counts = keep.sum(dim=1)
        queries = hidden.index_select(0, torch.cumsum(counts, dim=0) - counts)  # position 0
    return _checkpointed(last, hidden, queries, mask, layout)


def _checkpointed(layer: nn.Module, hidden: Tensor, queries: Tensor, mask: Tensor | None,
                  layout: _Layout) -> Tensor:
    """:func:`_layer`, recomputed in backward where the model checkpoints its layers
    (``train.activation_checkpointing``), as the layer's own call would be."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training \
            and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_layer, layer, hidden, queries, mask, layout,
                                                 use_reentrant=False)
    return _layer(layer, hidden, queries, mask, layout)


class _Layout:
    """Where the packed rows sit in the padded ``(B, S)`` batch, and the attention call."""

    def __init__(self, rows: Tensor, batch: int, length: int, attend: Callable):
        self.rows, self.batch, self.length, self.attend = rows, batch, length, attend

    def padded_heads(self, packed: Tensor, head_dim: int) -> Tensor:
        """Packed ``(N, H * D)`` rows as ``(B, H, S, D)``, zeros at the rows not computed."""
        width = packed.shape[-1]
        padded = packed.new_zeros(self.batch * self.length, width).index_copy(0, self.rows, packed)
        return padded.view(self.batch, self.length, -1, head_dim).transpose(1, 2)


def _layer(layer: nn.Module, hidden: Tensor, queries: Tensor, mask: Tensor | None,
           layout: _Layout) -> Tensor:
    """One BERT layer on packed rows: keys and values from ``hidden`` (every computed row),
    the rest for ``queries`` (the same rows, or the last layer's first positions ``(B, d)``);
    returns the layer's output at the query rows."""
    attn = layer.attention.self
    head_dim = attn.attention_head_size
    key = layout.padded_heads(attn.key(hidden), head_dim)
    value = layout.padded_heads(attn.value(hidden), head_dim)
    if queries is hidden:
        query = layout.padded_heads(attn.query(hidden), head_dim)
    else:  # one query per sequence: its mask row is the first position's
        query = attn.query(queries).view(layout.batch, 1, -1, head_dim).transpose(1, 2)
        mask = mask[:, :, :1] if mask is not None and mask.dim() == 4 else mask
    context, _ = layout.attend(attn, query, key, value, mask, scaling=attn.scaling,
                               dropout=attn.dropout.p if attn.training else 0.0)
    context = context.reshape(layout.batch * context.shape[1], -1)  # (B * S|1, H * D)
    if queries is hidden:
        context = context.index_select(0, layout.rows)
    attended = layer.attention.output(context, queries)
    return layer.feed_forward_chunk(attended)


def _backbone(model: nn.Module) -> nn.Module | None:
    """The BERT-structured encoder under ``model``, or None where this path does not apply."""
    backbone = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if backbone is None or backbone is model or config is None or config.is_decoder \
            or type(backbone).__name__ not in set(HEADS.values()):
        return None
    if HEADS.get(type(model).__name__) == "BertModel" and backbone.pooler is None:
        return None  # BERT's head reads the pooler
    if _attention_function(config, backbone) is None or _hooked(model, backbone, backbone.encoder):
        return None
    for layer in backbone.encoder.layer:
        if type(layer.attention.self).__name__ not in _SELF_ATTENTION \
                or _hooked(layer, layer.attention, layer.attention.self) \
                or getattr(layer, "_compiled_call_impl", None) is not None:
            return None
    return backbone


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _attention_function(config: Any, model: nn.Module) -> Callable | None:
    """The attention function the model's self-attention calls (None if unknown): the one
    the config names, or the model file's own eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # lazy, as above

    name = config._attn_implementation
    if name == "eager":
        return getattr(sys.modules[type(model).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get(name)
