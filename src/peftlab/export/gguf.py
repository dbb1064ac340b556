"""Write a Llama-architecture causal LM and its byte-level BPE tokenizer to one GGUF file,
the single-file format of llama.cpp, Ollama and LM Studio.

Adapters are folded first (``peftlab.merge``): GGUF runtimes read plain weights. The
tensor names, the metadata keys and the rotary layout follow the GGUF spec for ``llama``:
transformers keeps each head's rotary pairs as two halves (``rotate_half``) where llama.cpp
interleaves them, so the query and key rows are re-ordered per head on the way out. The
result is checked by reading it back with transformers' own GGUF loader (tests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from peftlab.methods import has_virtual_tokens, layers

DTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# transformers' name inside a decoder block -> GGUF's, for the 2-D weights and the norms
BLOCK_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


def export_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f16",
                name: str | None = None, tokenizer_pre: str = "default") -> Path:
    """Write ``model`` (a merged ``LlamaForCausalLM``) and ``tokenizer`` to ``path``.

    ``dtype``: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 for the 2-D weights (norm
    vectors always stay f32; a weight whose rows are not a multiple of 32 values stays f16
    under a block quantisation). The quantisers are gguf's own (llama.cpp's reference maths).
    ``tokenizer_pre`` names llama.cpp's pre-tokenizer regex set ("default" is GPT-2's; e.g.
    "smollm" or "llama-bpe" for models llama.cpp knows). The file is written atomically.
    """


    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {list(DTYPES)}")
    check_architecture(model)
    _check_plain(model)
    c = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    weight_type, file_type = QUANTS[dtype]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name or getattr(c, "_name_or_path", "") or "peftlab export")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(_rope_theta(c)))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type)
    _add_tokenizer(w, tokenizer, c.vocab_size, tokenizer_pre)

    for key, tensor in _gguf_tensors(model):
        data = tensor.detach().float().cpu()
        if data.ndim == 1 or weight_type == gguf.GGMLQuantizationType.F32:
            w.add_tensor(key, data.numpy().astype(np.float32))
        elif weight_type == gguf.GGMLQuantizationType.F16:
            w.add_tensor(key, data.numpy().astype(np.float16))
        elif weight_type != gguf.GGMLQuantizationType.BF16 and data.shape[-1] % 32:
            w.add_tensor(key, data.numpy().astype(np.float16))  # blocks need rows of 32k
        else:
            packed = gguf.quants.quantize(data.numpy().astype(np.float32), weight_type)
            w.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=weight_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def check_architecture(model: nn.Module) -> None:
    kind = type(model).__name__
    if getattr(model.config, "model_type", None) != "llama" or kind != "LlamaForCausalLM":
        raise ValueError(f"GGUF export supports LlamaForCausalLM (SmolLM2, TinyLlama, Llama "
                         f"2/3 ...); this model is {kind} ({model.config.model_type})")
    scaling = getattr(model.config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {scaling} is not exported yet; only plain RoPE")


def _check_plain(model: nn.Module) -> None:
    wrapped = [n for n, m in model.named_modules() if isinstance(m, layers.Wrapper)]
    virtual = has_virtual_tokens(model)
    if wrapped or virtual:
        raise ValueError("the model still carries adapter layers (e.g. "
                         f"{wrapped[:1] or ['a prompt encoder']}); fold them first with "
                         "peftlab.merge(model) (LoRA, IA3) — GGUF stores plain weights")


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved pairs."""
    rows, *rest = weight.shape
    return (weight.reshape(n_head, 2, rows // n_head // 2, *rest).transpose(1, 2)
            .reshape(weight.shape))


def _gguf_tensors(model: nn.Module):
    c = model.config
    embed = model.get_input_embeddings().weight
    yield "token_embd.weight", embed
    for i, block in enumerate(model.model.layers):
        for hf, short in BLOCK_TENSORS.items():
            module = block.get_submodule(hf)
            if getattr(module, "bias", None) is not None:
                raise ValueError(f"model.layers.{i}.{hf} has a bias, which GGUF llama has no "
                                 "tensor for")
            weight = module.weight
            if short == "attn_q":
                weight = rope_permute(weight, c.num_attention_heads)
            elif short == "attn_k":
                weight = rope_permute(weight, c.num_key_value_heads)
            yield f"blk.{i}.{short}.weight", weight
    yield "output_norm.weight", model.model.norm.weight
    head = model.get_output_embeddings().weight
    if head.data_ptr() != embed.data_ptr():  # tied heads reuse token_embd
        yield "output.weight", head


def _add_tokenizer(w, tokenizer, vocab_size: int, pre: str) -> None:


    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in "
                         f"SmolLM2 and Llama 3); this tokenizer is {model.get('type')!r}")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, the model {vocab_size} rows")
    for i in range(len(tokens), vocab_size):  # embedding rows with no token behind them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for token, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                       ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        tid = getattr(tokenizer, f"{token}_token_id", None)
        if tid is not None:
            add(tid)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
