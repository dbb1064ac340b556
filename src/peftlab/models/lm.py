"""Language-model maths shared by every task and evaluation: hidden states without the LM
head, a memory-bounded cross-entropy through a frozen head, completion log-probs, and the
masked-LM loss on masked positions only.

The LM head runs only on positions whose next token carries a label, so prompt and
padding positions never materialise full-vocabulary logits -- a large saving on a CPU,
where the 49k-vocabulary projection is a big share of a training step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label of a position that carries no loss (prompt, padding)


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (fp32 logits) against ``targets``, in chunks.

    With a frozen ``nn.Linear`` head (LoRA and friends; also a tied embedding that is not
    trained) the gradient goes through :class:`_FrozenHeadCrossEntropy`, which keeps at most
    one chunk of logits alive. Otherwise (a trained head, or no gradient needed) each chunk
    runs through ``head`` as usual; with a gradient, autograd then keeps every chunk's logits
    until backward.
    """
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    device = hidden.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hidden.dtype
    fused = (type(head) is nn.Linear and torch.is_grad_enabled() and hidden.requires_grad
             and not weight.requires_grad and (bias is None or not bias.requires_grad)
             and not (head._forward_hooks or head._forward_pre_hooks)
             and (autocast or weight.dtype == hidden.dtype))
    if fused:
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _FrozenHeadCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), b, targets,
                                                 fused_chunk_rows(weight.shape[0], chunk_size))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start:start + chunk_size]).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total


CHUNK_LOGITS_BYTES = 30 << 20  # a fused chunk's fp32 logits: under glibc's 32 MiB mmap ceiling


def fused_chunk_rows(vocab: int, chunk_size: int) -> int:
    """Rows per chunk of :class:`_FrozenHeadCrossEntropy`: at most ``chunk_size``, and few
    enough that a chunk's fp32 logits stay under 30 MiB (but not below 32 rows).

    Why: malloc maps a larger buffer fresh from the kernel and unmaps it when freed, so every
    chunk paid its page faults again: a 4,096-row chunk of SmolLM2's 49,152-word logits is
    800 MB in fp32. The loss and gradient of 1,600 tokens took 510-600 ms in one chunk and
    350-410 ms in 160-256-row chunks (0 page faults; 64 rows: 570 ms, the head matmul gets
    too thin), and a whole SFT step of 8 x 256 tokens 3.2 -> 2.7 s (2-core EPYC, bf16).
    Only this path keeps one chunk alive at a time (its logits and their softmax, two
    buffers each within the bound), so only here does the size matter.
    """
    return min(chunk_size, max(32, CHUNK_LOGITS_BYTES // (4 * vocab)))


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed CE over chunks of hidden states for a frozen head (W, b), memory-bounded.

    The gradient of the summed CE w.r.t. a chunk's logits is softmax - onehot, so the forward
    turns each chunk's logits into that and multiplies by W right away: only the (tokens,
    hidden) input gradient is kept (the same size as the hidden states autograd would
    otherwise save), never the (tokens, vocab) logits, and backward does no head matmul at
    all. Inputs arrive in one dtype; the caller disables autocast.

    The softmax runs in that dtype (ATen's kernel accumulates in fp32 and rounds once) and
    each token's loss is -log of its target's probability. Why: the same maths as fp32
    logits with a manual log-sum-exp took 7-8 passes over every chunk (cast, max, subtract,
    exp, sum, divide, cast back); one fused kernel cut a 160 x 49,152 bf16 chunk from 20-33 ms
    to 6-7 ms, ~0.15 s of a SmolLM2 step (2-core AMX Xeon). In bf16 a probability carries a
    relative error <= 2^-9, so a token's loss is off by <= 0.002 nats, of either sign (the
    summed loss of 1,600 random tokens moved 0.055 of 18,436); the gradient was rounded to
    bf16 before as well. A probability below the dtype's smallest normal (loss > ~87) is
    recomputed from the logits in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            t = targets[rows]
            logits = F.linear(hidden[rows], weight, bias)
            probs = torch.softmax(logits, dim=-1)
            at = (torch.arange(t.shape[0], device=t.device), t)
            target_probs = probs[at]
            token_loss = target_probs.float().log().neg_()  # .float() may alias in fp32
            tiny = target_probs < torch.finfo(probs.dtype).tiny
            if bool(tiny.any()):
                token_loss[tiny] = F.cross_entropy(logits[tiny].float(), t[tiny], reduction="none")
            total += token_loss.sum()
            del logits
            probs[at] -= 1.0
            grad_hidden[rows] = probs @ weight
            del probs
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        # Scale in fp32 (grad_total is e.g. 1/n, which bf16 would round).
        return (grad_hidden.float() * grad_total).to(grad_hidden.dtype), None, None, None, None


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is its real tokens followed only by padding.

    Under the causal mask a real token then never sees a padded one, so the padding mask
    changes nothing at the positions a loss reads: the caller may pass no mask, and SDPA runs
    its causal kernel, which skips the masked half of the score blocks (measured: 30% less
    attention time at 1,024 tokens) instead of reading an explicit (B, 1, S, S) mask.
    """
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def backbone_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None,
                           position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states of a transformers causal LM without running its LM head.

    Packed rows (peftlab.data.packing) pass ``position_ids`` that restart at every example
    and ``attention_mask=None``: transformers then masks attention block-diagonally.
    """
    backbone = model.base_model if model.base_model is not model else None
    if backbone is None:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer backbone "
                        "(expected a transformers *ForCausalLM model)")
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Summed log-prob of each row's labelled tokens, ``[batch]`` in fp32."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = backbone_hidden_states(model, input_ids, attention_mask)[:, :-1][keep]
    rows = keep.nonzero()[:, 0]
    logps = _target_logps(model.get_output_embeddings(), hidden, targets[keep], chunk_size)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, logps)


def _target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int) -> torch.Tensor:
    """fp32 log-prob of each target from its hidden state (``[n, d]`` -> ``[n]``), the LM head
    run ``chunk_size`` rows at a time: a whole batch's vocabulary logits would not fit."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start:start + chunk_size]).float()
        pieces.append(-F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none"))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def masked_lm_head(model: nn.Module) -> nn.Module:
    """The MLM head of a transformers ``*ForMaskedLM`` model: its one child besides the
    backbone (BERT's ``cls``, RoBERTa's ``lm_head``), which maps hidden states to logits."""
    backbone = model.base_model
    heads = [m for m in model.children() if m is not backbone and not isinstance(m, nn.ModuleDict)]
    if backbone is model or len(heads) != 1:
        raise TypeError(f"{type(model).__name__}: cannot find one masked-LM head next to the "
                        "backbone (expected a transformers *ForMaskedLM model such as "
                        "BertForMaskedLM)")
    return heads[0]


def masked_lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of a masked LM over the labelled (masked) positions only.

    The head (transform + vocabulary projection) runs on those ~15% of positions, not on
    every position as ``model(labels=...)`` would.
    """
    keep = labels != IGNORE_INDEX
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    logits = masked_lm_head(model)(hidden[keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum")


def token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Log-prob of each next token, ``[batch, length - 1]`` in fp32, 0 where ``keep`` is False.

    ``keep[:, t]`` selects the prediction of token ``t + 1``; the LM head runs only there. One
    backbone pass serves several sums over different masks (e.g. ORPO's answer log-probs and
    its NLL over the whole sequence).
    """
    hidden = backbone_hidden_states(model, input_ids, attention_mask)[:, :-1][keep]
    logps = _target_logps(model.get_output_embeddings(), hidden, input_ids[:, 1:][keep],
                          chunk_size)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=input_ids.device)
    return out.masked_scatter(keep, logps)
