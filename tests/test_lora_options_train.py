"""PiSSA/OLoRA init, LoRA+ and NEFTune through ``peftlab train``: the loss falls, the saved
adapter reproduces the trained model on a freshly loaded base, and resume is exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import peftlab
from peftlab.cli import main
from peftlab.config import from_dict
from peftlab.models import load_model
from peftlab.training.recipe import run_training


def _cfg(model_dir: Path, data: dict[str, Path], out: Path, init: str, **train) -> dict:
    return {"model": str(model_dir),
            "method": {"name": "lora", "r": 4, "alpha": 8, "init": init, "lora_plus_ratio": 4},
            "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                     "max_rows": 48},
            "train": {"batch_size": 8, "lr": 2e-3, "precision": "fp32", "log_every": 1,
                      "neftune_alpha": 5.0, "num_threads": 1, **train},
            "output_dir": str(out)}


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_train_save_reload(init, tiny_chat_model_dir, demo_data_dir, tmp_path):
    model, tok = load_model(str(tiny_chat_model_dir))
    cfg = from_dict(_cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "run", init, epochs=2))
    summary = run_training(cfg, progress=False, model=model, tokenizer=tok)
    val = [r["val_loss"] for r in summary.result.history if "val_loss" in r]
    assert val[-1] < val[0]

    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    fresh, _ = peftlab.load(str(tiny_chat_model_dir), adapter=summary.adapter_dir)
    with torch.no_grad():
        assert_close(fresh(input_ids=ids).logits, trained)


def test_resume_is_exact_with_all_three_options(tiny_chat_model_dir, demo_data_dir, tmp_path):
    """Checkpoints keep the LoRA+ groups and the RNG that draws NEFTune's noise."""
    config = tmp_path / "run.yaml"
    cfg = _cfg(tiny_chat_model_dir, demo_data_dir, tmp_path / "a", "pissa", max_steps=4,
               save_every=2, batch_size=4)
    config.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["train", str(config), "--no-progress"]) == 0
    straight = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))

    b = ["--set", f"output_dir={tmp_path / 'b'}"]
    assert main(["train", str(config), "--no-progress", *b]) == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000004")
    assert main(["train", str(config), "--no-progress", "--resume", *b]) == 0
    resumed = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
