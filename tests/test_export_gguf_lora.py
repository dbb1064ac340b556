"""LoRA-only GGUF adapter export (llama.cpp's ``--lora`` format): applied the way llama.cpp
applies it (W + alpha / rank * B A on the base GGUF's tensors) it must give the merged GGUF's
tensors; its metadata and names follow the format; what the format cannot hold is refused.
(Loading it in llama.cpp itself is the opt-in ``-m llamacpp`` test.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import peftlab
from peftlab.cli import main
from peftlab.export.gguf import export_gguf
from peftlab.export.gguf_lora import export_gguf_lora
from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.models import load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data, dtype=np.float32).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def _meta(path, key: str):
    field = gguf.GGUFReader(str(path)).fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_applied_like_llamacpp_gives_the_merged_weights(tiny_chat_model_dir, tmp_path,
                                                                rslora):
    base, tok = load_model(str(tiny_chat_model_dir))
    export_gguf(base, tok, tmp_path / "base.gguf", dtype="f32")
    model, _ = load_model(str(tiny_chat_model_dir))
    torch.manual_seed(5)
    apply_lora(model, LoraConfig(r=4, alpha=8, init="random", target_modules=ALL,
                                 use_rslora=rslora, layers_to_transform=[1]))
    export_gguf_lora(model, tmp_path / "lora.gguf", name="facts")
    export_gguf(peftlab.merge(model), tok, tmp_path / "merged.gguf", dtype="f32")

    assert _meta(tmp_path / "lora.gguf", "general.type") == "adapter"
    assert _meta(tmp_path / "lora.gguf", "adapter.type") == "lora"
    assert _meta(tmp_path / "lora.gguf", "general.architecture") == "llama"
    alpha = float(_meta(tmp_path / "lora.gguf", "adapter.lora.alpha"))
    assert alpha == pytest.approx(8 / (2 if rslora else 4) * 4)  # scaling * r

    plain, lora, merged = (_tensors(tmp_path / f"{n}.gguf") for n in ("base", "lora", "merged"))
    adapted = sorted({k.rsplit(".", 1)[0] for k in lora})
    assert adapted == sorted(f"blk.1.{s}.weight" for s in ("attn_q", "attn_k", "attn_v",
                                                           "attn_output", "ffn_gate", "ffn_up",
                                                           "ffn_down"))
    for name, weight in plain.items():
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            assert a.shape == (4, weight.shape[1]) and b.shape == (weight.shape[0], 4)
            weight = weight + alpha / a.shape[0] * (b @ a)
        torch.testing.assert_close(torch.from_numpy(weight), torch.from_numpy(merged[name]))


def test_what_the_format_cannot_hold_is_refused(tiny_chat_model_dir, tmp_path):
    model, _ = load_model(str(tiny_chat_model_dir))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_gguf_lora(model, tmp_path / "x.gguf")
    apply_lora(model, LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        export_gguf_lora(model, tmp_path / "x.gguf")
    model, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        export_gguf_lora(model, tmp_path / "x.gguf")
    model, _ = load_model(str(tiny_chat_model_dir))
    apply_lora(model, LoraConfig(r=2, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        export_gguf_lora(model, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="dtype"):
        export_gguf_lora(model, tmp_path / "x.gguf", dtype="q4_0")
    assert not list(tmp_path.iterdir())


def test_export_cli_writes_the_adapter_and_the_merged_model(tiny_chat_model_dir, tmp_path,
                                                             capsys):
    model, _ = load_model(str(tiny_chat_model_dir))
    torch.manual_seed(6)
    apply_lora(model, LoraConfig(r=4, alpha=16, init="random"))
    save_lora(model, tmp_path / "adapter")
    assert main(["export", "--model", str(tiny_chat_model_dir), "--adapter",
                 str(tmp_path / "adapter"), "--gguf-adapter", str(tmp_path / "a.gguf"),
                 "--gguf", str(tmp_path / "m.gguf"), "--dtype", "q4_0"]) == 0
    out = capsys.readouterr().out
    assert "wrote gguf_adapter" in out and "wrote gguf:" in out
    assert _meta(tmp_path / "a.gguf", "general.name") == "adapter"
    assert main(["export", "--model", str(tiny_chat_model_dir), "--gguf-adapter",
                 str(tmp_path / "b.gguf")]) == 2
    assert "--adapter" in capsys.readouterr().err
