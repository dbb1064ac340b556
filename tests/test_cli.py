"""The CLI end to end on the tiny model: train -> eval -> chat, and clear errors."""

from __future__ import annotations

import json

import yaml

from peftlab.cli import main


def _write_config(path, model_dir, data, out, **train):
    path.write_text(yaml.safe_dump({
        "model": str(model_dir),
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_rows": 32},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 3e-3, "precision": "fp32", **train},
        "output_dir": str(out),
    }))
    return path


def test_train_eval_chat(diverse_chat_model_dir, demo_data_dir, tmp_path, capsys):
    # the diverse tiny model: its replies are non-empty and training changes them
    model_dir = diverse_chat_model_dir
    cfg = _write_config(tmp_path / "run.yaml", model_dir, demo_data_dir, tmp_path / "o")
    assert main(["train", str(cfg), "--no-progress", "--set", "train.lr=0.01"]) == 0
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["train"]["lr"] == 0.01
    capsys.readouterr()

    assert main(["eval", str(cfg)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"base", "adapter"} <= results.keys()
    assert results["adapter"]["val_loss"] < results["base"]["val_loss"]

    adapter = tmp_path / "o" / "adapter"
    rc = main(["chat", "--model", str(model_dir), "--adapter", str(adapter),
               "--prompt", "What is the price?", "--max-new-tokens", "5"])
    assert rc == 0
    from peftlab.api import load
    from peftlab.evaluation.generate import generate_replies

    chat = [[{"role": "user", "content": "What is the price?"}]]
    model, tok = load(str(model_dir), adapter=adapter)
    expected = generate_replies(model, tok, chat, max_new_tokens=5)[0]
    assert capsys.readouterr().out == expected + "\n"
    base, _ = load(str(model_dir))
    assert expected and expected != generate_replies(base, tok, chat, max_new_tokens=5)[0]


def test_interactive_chat_reads_until_eof(tiny_chat_model_dir, monkeypatch, capsys):
    lines = iter(["hello", "/reset", "again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(tiny_chat_model_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("bot> ") == 2


def test_config_error_exits_2_naming_the_key(tiny_chat_model_dir, demo_data_dir, tmp_path, capsys):
    cfg = _write_config(tmp_path / "bad.yaml", tiny_chat_model_dir, demo_data_dir, tmp_path / "o",
                        learning_rate=0.1)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train: unknown key 'learning_rate'" in err and "Traceback" not in err


def test_bad_data_row_exits_2_naming_file_and_row(tiny_chat_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_chat_model_dir),
                                   "data": {"train": str(data)}, "output_dir": str(tmp_path)}))
    assert main(["train", str(cfg)]) == 2
    assert f"{data}:2" in capsys.readouterr().err
