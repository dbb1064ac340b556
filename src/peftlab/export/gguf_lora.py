"""A LoRA adapter on its own as a GGUF adapter file: llama.cpp's ``--lora`` format.

Next to the merged export (:mod:`peftlab.export.gguf`) this keeps the base GGUF shared and
ships only the low-rank matrices: for each adapted projection the file holds
``blk.<i>.<name>.weight.lora_a`` (rank x in) and ``.lora_b`` (out x rank), with metadata
``general.type = adapter``, ``adapter.type = lora`` and ``adapter.lora.alpha``. llama.cpp
adds ``alpha / rank * B A`` to each weight, so the alpha written is ``scaling * r`` (which
also carries rsLoRA's ``alpha / sqrt(r)``). Query and key rows are re-ordered per head like
the base weights (llama.cpp interleaves rotary pairs), which for ``B A`` means B's rows.
DoRA, ``modules_to_save`` and modules outside the decoder blocks have no place in the format
and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from torch import nn

from peftlab.export.gguf import BLOCK_TENSORS, check_architecture, rope_permute
from peftlab.methods import lora

ADAPTER_DTYPES = ("f32", "f16")


def export_gguf_lora(model: nn.Module, path: str | Path, adapter_name: str = "default",
                     dtype: str = "f32", name: str | None = None) -> Path:
    """Write LoRA adapter ``adapter_name`` of ``model`` (a LlamaForCausalLM with the adapter
    loaded, not merged) to ``path`` (atomically)."""
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype: {dtype!r} is not one of {list(ADAPTER_DTYPES)}")
    check_architecture(model)
    tensors, cfg = _adapter_tensors(model, adapter_name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name or adapter_name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.scaling * cfg.r))
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for key, tensor in tensors:
        w.add_tensor(key, tensor.detach().float().cpu().numpy().astype(np_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _adapter_tensors(model: nn.Module, adapter_name: str):
    layers = {n: m for n, m in lora.lora_layers(model).items() if adapter_name in m.configs}
    if not layers:
        raise ValueError(f"the model has no LoRA adapter {adapter_name!r} (it has "
                         f"{lora.adapter_names(model) or 'none'})")
    cfg = next(iter(layers.values())).configs[adapter_name]
    if cfg.use_dora:
        raise ValueError("a DoRA adapter has no GGUF adapter form (llama.cpp applies plain "
                         "LoRA); export the merged model instead")
    if cfg.modules_to_save:
        raise ValueError(f"the adapter also trains {cfg.modules_to_save} (modules_to_save), "
                         "which a GGUF adapter cannot carry; export the merged model instead")
    c = model.config
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    out = []
    for module_name, layer in layers.items():
        if layer.merged_adapter is not None:
            raise ValueError(f"{module_name} is merged; export the adapter before merging")
        key = _gguf_name(module_name)
        a = layer.lora_A[adapter_name].weight  # (r, in)
        b = layer.lora_B[adapter_name].weight  # (out, r)
        short = key.split(".")[2]
        if short in heads:
            b = rope_permute(b, heads[short])
        out += [(f"{key}.lora_a", a), (f"{key}.lora_b", b)]
    return out, cfg


def _gguf_name(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``."""
    parts = module_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        short = BLOCK_TENSORS.get(".".join(parts[3:]))
        if short is not None and short.startswith(("attn_", "ffn_")) and "norm" not in short:
            return f"blk.{parts[2]}.{short}.weight"
    raise ValueError(f"LoRA on {module_name!r} has no GGUF adapter tensor (only the attention "
                     "and MLP projections of the decoder blocks do)")
