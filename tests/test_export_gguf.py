"""GGUF export: read back by transformers' own GGUF loader, the model must give the same
logits (f32 exactly, f16/bf16/q8_0 within their rounding) and the tokenizer the same ids; a
merged LoRA exports what the adapter computed; unexportable models are refused clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftlab
from peftlab.export.gguf import export_gguf
from peftlab.methods.lora import LoraConfig, apply_lora
from peftlab.models import load_model

TEXT = "<|im_start|>user\ncapital of the sea?<|im_end|>\n<|im_start|>assistant\n"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rounded(model, dtype: str):
    """The model with its 2-D weights rounded as ``dtype`` stores them (norms stay f32)."""
    import copy

    import gguf

    kind = None if dtype == "f32" else getattr(gguf.GGMLQuantizationType, dtype.upper())
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.ndim == 2 and kind is not None:
                packed = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(packed, kind).copy()))
    return out


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1"])
def test_gguf_round_trip_through_transformers(tiny_chat_model_dir, tmp_path, dtype):
    model, tok = load_model(str(tiny_chat_model_dir))
    model.eval()
    out = export_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    expected = _logits(_rounded(model, dtype), ids)
    torch.testing.assert_close(_logits(back, ids), expected, rtol=1e-4, atol=1e-5)
    if dtype == "f32":
        back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
        for text in (TEXT, "Ünïcode and   spaces\n\ttabs", "plain words"):
            assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
        assert back_tok.eos_token_id == tok.eos_token_id
        assert back_tok.chat_template == tok.chat_template


def test_merged_lora_exports_what_the_adapter_computed(tiny_chat_model_dir, tmp_path):
    model, tok = load_model(str(tiny_chat_model_dir))
    torch.manual_seed(3)
    apply_lora(model, LoraConfig(r=4, alpha=16, init="random"))
    model.eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with_adapter = _logits(model, ids)
    with pytest.raises(ValueError, match="peftlab.merge"):
        export_gguf(model, tok, tmp_path / "unmerged.gguf")
    merged = peftlab.merge(model)
    export_gguf(merged, tok, tmp_path / "merged.gguf", dtype="f32")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="merged.gguf",
                                                dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(back, ids), with_adapter, rtol=0, atol=1e-4)
    assert not (tmp_path / "unmerged.gguf").exists()


def test_refuses_other_architectures_and_bad_dtype(tiny_chat_model_dir, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    model, tok = load_model(str(tiny_chat_model_dir))
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, tok, tmp_path / "x.gguf", dtype="q4")
    bert = BertForMaskedLM(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        export_gguf(bert, tok, tmp_path / "x.gguf")


def test_export_cli_folds_the_adapter(tiny_chat_model_dir, tmp_path, capsys):
    from peftlab.cli import main
    from peftlab.methods.lora import save_lora

    model, tok = load_model(str(tiny_chat_model_dir))
    torch.manual_seed(4)
    apply_lora(model, LoraConfig(r=4, alpha=16, init="random"))
    save_lora(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_chat_model_dir))
    model.eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    expected = _logits(model, ids)
    assert main(["export", "--model", str(tiny_chat_model_dir), "--adapter",
                 str(tmp_path / "adapter"), "--gguf", str(tmp_path / "g" / "m.gguf"),
                 "--dtype", "f32", "--hf", str(tmp_path / "hf")]) == 0
    assert "wrote gguf" in capsys.readouterr().out
    for kwargs in ({"pretrained_model_name_or_path": str(tmp_path / "hf")},
                   {"pretrained_model_name_or_path": str(tmp_path / "g"), "gguf_file": "m.gguf"}):
        back = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(back, ids), expected, rtol=0, atol=1e-4)
    assert main(["export", "--model", str(tiny_chat_model_dir)]) == 2
    assert "--gguf" in capsys.readouterr().err
