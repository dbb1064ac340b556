"""Adapter merging (methods.lora_merge, ``peftlab merge-adapters``) against peft's
``add_weighted_adapter`` (cat, svd, ties_svd) and peft's DARE/TIES functions, plus a TIES
example computed by hand."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab.cli import main
from peftlab.methods import method_for_adapter_dir
from peftlab.methods.lora import LoraConfig, apply_lora, save_lora
from peftlab.methods.lora_merge import (
    combine,
    merge_lora_adapters,
    module_generator,
    read_lora_file,
)

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
# three single-task adapters: overlapping but different modules, one with rsLoRA
ADAPTERS = {
    "a": {"target_modules": ["q_proj", "v_proj", "down_proj"], "alpha": 8},
    "b": {"target_modules": ["q_proj", "v_proj", "up_proj"], "alpha": 16},
    "c": {"target_modules": ["q_proj", "o_proj"], "alpha": 4, "use_rslora": True},
}
WEIGHTS = [0.7, -0.4, 1.3]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        model = tiny_llama()
        torch.manual_seed(10 + i)
        apply_lora(model, LoraConfig(r=4, init="random", **options))
        dirs[name] = root / name
        save_lora(model, dirs[name], base_model_name_or_path="tiny")
    return dirs


def peft_with_adapters(saved: dict[str, Path]) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(tiny_llama(), saved["a"], adapter_name="a")
        for name in ("b", "c"):
            model.load_adapter(saved[name], adapter_name=name)
    return model.eval()


def peft_deltas(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): m.get_delta_weight(adapter)
            for name, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def our_deltas(merged) -> dict[str, torch.Tensor]:
    """s * B A per module of a merged adapter (scaling 1: alpha = r)."""
    assert merged.config["lora_alpha"] == merged.config["r"] == merged.rank
    prefix = "base_model.model."
    return {k[len(prefix):-len(".lora_A.weight")]:
            merged.tensors[k.replace("lora_A", "lora_B")] @ merged.tensors[k]
            for k in merged.tensors if k.endswith("lora_A.weight")}


def test_linear_is_exact_and_equals_peft_cat(saved, tmp_path):
    theirs = peft_with_adapters(saved)
    theirs.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "m", combination_type="cat")
    merged = merge_lora_adapters([saved[n] for n in ADAPTERS], WEIGHTS)
    assert merged.rank == 12 and max(merged.errors.values()) == 0.0
    reference = peft_deltas(theirs, "m")
    mine = our_deltas(merged)
    assert mine.keys() == reference.keys()
    for module in mine:
        assert_close(mine[module], reference[module], msg=module)
    # exact: the weighted sum of the three updates, module by module
    files = [read_lora_file(saved[n]) for n in ADAPTERS]
    q = "model.layers.1.self_attn.q_proj"
    expected = sum(w * f.scaling * f.factors[q][1] @ f.factors[q][0]
                   for w, f in zip(WEIGHTS, files, strict=True))
    assert_close(mine[q], expected)
    # and the saved file gives peft's merged model its outputs
    peftlab.merge_adapters([saved[n] for n in ADAPTERS], tmp_path / "m", weights=WEIGHTS)
    theirs.set_adapter("m")
    with torch.no_grad():
        expected_logits = theirs(input_ids=IDS).logits
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "m").eval()
        assert_close(loaded(input_ids=IDS).logits, expected_logits)
        ours = tiny_llama()
        method_for_adapter_dir(tmp_path / "m").load(ours, tmp_path / "m")
        assert_close(ours(input_ids=IDS).logits, expected_logits)


@pytest.mark.parametrize("combination, kwargs", [
    ("svd", {}),  # linear at a lower rank
    ("ties_svd", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties_svd", {"density": 0.3, "majority_sign_method": "frequency"}),
])
def test_low_rank_rules_equal_peft_svd_variants(saved, combination, kwargs):
    theirs = peft_with_adapters(saved)
    rank = 6
    theirs.add_weighted_adapter(list(ADAPTERS), WEIGHTS, "m", combination_type=combination,
                                svd_rank=rank, **kwargs)
    ours = "linear" if combination == "svd" else "ties"
    merged = merge_lora_adapters([saved[n] for n in ADAPTERS], WEIGHTS, ours,
                                 density=kwargs.get("density"),
                                 majority_sign=kwargs.get("majority_sign_method", "total"),
                                 rank=rank)
    reference, mine = peft_deltas(theirs, "m"), our_deltas(merged)
    assert mine.keys() == reference.keys()
    for module in mine:
        assert_close(mine[module], reference[module], msg=module)
    assert 0 < max(merged.errors.values()) < 1  # rank 6 < the merged update's rank


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_dare_rule_equals_peft_with_the_same_random_stream(combination):
    """peft draws DARE's masks from the global RNG in module order; ours come from a generator
    per module (seed + name). With the same stream, the results are the same."""
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(16, 8, generator=gen) for _ in range(3)]
    weights = torch.tensor(WEIGHTS)
    torch.manual_seed(module_generator(5, "some.module").initial_seed())
    reference = getattr(merge_utils, combination)(deltas, weights, 0.4)
    mine = combine(deltas, WEIGHTS, combination, 0.4, "total", module_generator(5, "some.module"))
    assert_close(mine, reference)


def test_dare_is_seeded(saved):
    dirs = [saved[n] for n in ADAPTERS]
    one = merge_lora_adapters(dirs, combination="dare_ties", density=0.5, seed=1)
    again = merge_lora_adapters(dirs, combination="dare_ties", density=0.5, seed=1)
    other = merge_lora_adapters(dirs, combination="dare_ties", density=0.5, seed=2)
    key = next(iter(one.tensors))
    assert torch.equal(one.tensors[key], again.tensors[key])
    assert not torch.allclose(one.tensors[key], other.tensors[key])


def test_ties_by_hand():
    """Trim to the top half by magnitude, elect signs by the sum, average the agreeing ones."""
    d1 = torch.tensor([[4.0, -1.0], [0.5, -3.0]])  # keeps 4, -3
    d2 = torch.tensor([[-2.0, 5.0], [0.1, -6.0]])  # keeps 5, -6
    d3 = torch.tensor([[1.0, -9.0], [3.0, 0.2]])   # keeps -9, 3
    merged = combine([d1, d2, d3], [1.0, 1.0, 1.0], "ties", density=0.5)
    # entry (0,0): 4 only -> 4; (0,1): 5 - 9 < 0 -> -9; (1,0): 3; (1,1): -3, -6 -> -4.5
    assert_close(merged, torch.tensor([[4.0, -9.0], [3.0, -4.5]]))
    freq = combine([d1, d2, d3], [1.0, 1.0, 1.0], "ties", density=0.5, majority_sign="frequency")
    # (0,1): one positive, one negative vote -> tie -> positive: 5
    assert_close(freq, torch.tensor([[4.0, 5.0], [3.0, -4.5]]))


def test_cli_writes_a_loadable_adapter_and_a_summary(saved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge-adapters", "--adapter", str(saved["a"]), "--adapter", str(saved["b"]),
                 "--combination", "ties", "--density", "0.5", "--output", str(out)]) == 0
    assert "rank 8" in capsys.readouterr().out
    summary = json.loads((out / "merge.json").read_text())
    assert summary["weights"] == [1.0, 1.0] and summary["rank"] == 8
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["r"] == 8
    model = tiny_llama()
    method_for_adapter_dir(out).load(model, out)
    assert model(input_ids=IDS).logits.isfinite().all()


def _write_config(directory: Path, tmp_path: Path, **changes) -> Path:
    copy_dir = tmp_path / f"edited_{len(list(tmp_path.iterdir()))}"
    copy_dir.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (copy_dir / name).write_bytes((directory / name).read_bytes())
    path = copy_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy_dir


@pytest.mark.parametrize("args, message", [
    (["--combination", "ties"], "--density is required for ties"),
    (["--density", "0.5"], "--density: only for ties"),
    (["--weights", "1"], "--weights: 1 weights for 2 adapters"),
    (["--weights", "a,b"], "--weights 'a,b': expected numbers"),
    (["--combination", "mean"], "--combination: 'mean' is not one of"),
    (["--combination", "ties", "--density", "1.5"], "--density must be in (0, 1]"),
])
def test_bad_options_one_line_exit_2(saved, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["merge-adapters", "--adapter", str(saved["a"]), "--adapter", str(saved["b"]),
                 "--output", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_incompatible_adapters_name_the_file_and_key(saved, tmp_path):
    other_base = _write_config(saved["b"], tmp_path, base_model_name_or_path="other")
    with pytest.raises(ValueError, match="key 'base_model_name_or_path' is 'other'"):
        merge_lora_adapters([saved["a"], other_base])
    dora = _write_config(saved["b"], tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="key 'use_dora' is true"):
        merge_lora_adapters([saved["a"], dora])
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    save_lora(model, tmp_path / "with_head", base_model_name_or_path="tiny")
    with pytest.raises(ValueError, match="key 'modules_to_save'"):
        merge_lora_adapters([saved["a"], tmp_path / "with_head"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty"):
        peftlab.merge_adapters([saved["a"]], tmp_path / "full")
    with pytest.raises(ValueError, match="is one of the adapters"):
        peftlab.merge_adapters([saved["a"]], saved["a"], overwrite=True)
