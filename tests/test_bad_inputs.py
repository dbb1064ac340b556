"""Bad input, as a new user gives it: every case exits 2 with one line naming the culprit,
no traceback, and the files of an earlier good run stay byte for byte as they were.

The train cases point at the earlier run's own ``output_dir`` with ``--overwrite``: a run
that would replace it if its input were good must, with bad input, fail before writing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from peftlab.cli import main


@dataclass
class World:
    """What the cases work with: the tiny model, data, the earlier run and its config."""

    root: Path
    model: Path
    data: dict[str, Path]
    run: Path
    config: dict
    files: dict[str, str] = field(default_factory=dict)

    def write_config(self, name: str, change: Callable[[dict], None] | None = None) -> Path:
        cfg = json.loads(json.dumps(self.config))
        if change is not None:
            change(cfg)
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        return path

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / "inputs" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tiny_chat_model_dir, demo_data_dir, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "earlier-run"
    config = {
        "model": str(tiny_chat_model_dir),
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(demo_data_dir["train"]),
                 "validation": str(demo_data_dir["validation"]), "max_rows": 16},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
                  "save_every": 1},
        "output_dir": str(run),
    }
    w = World(root, tiny_chat_model_dir, demo_data_dir, run, config)
    w.bert = _tiny_bert(root / "tiny-bert")
    assert main(["train", str(w.write_config("good")), "--no-progress"]) == 0
    w.files = snapshot(run)
    assert "adapter/adapter_model.safetensors" in w.files
    return w


def _tiny_bert(directory: Path) -> Path:
    """A 2-layer BERT with a word-level tokenizer, saved like a hub checkpoint."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "film", "fun"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def cfg_with(path: str, value) -> Callable[[dict], None]:
    """A change to the good config: set ``a.b.c`` to ``value`` (None removes the key)."""
    def change(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return change


def train_case(w: World, name: str, change: Callable[[dict], None] | None = None,
               *extra: str) -> list[str]:
    return ["train", str(w.write_config(name, change)), "--no-progress", "--overwrite", *extra]


def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


# name -> (argv builder, text the error line must contain)
CASES: dict[str, tuple[Callable[[World], list[str]], str]] = {
    # ---------------------------------------------------------------- train: config
    "config file missing": (lambda w: ["train", str(w.root / "nope.yaml")],
                            "config file not found"),
    "config not YAML": (lambda w: ["train", str(w.write("bad.yaml", "model: [unclosed"))],
                        "not valid YAML"),
    "config top level a list": (lambda w: ["train", str(w.write("list.yaml", "- a\n- b\n"))],
                                "top level must be a mapping"),
    "unknown top key": (lambda w: train_case(w, "top", cfg_with("trian", {"lr": 1})),
                        "unknown key 'trian' (did you mean 'train'?)"),
    "unknown train key": (lambda w: train_case(w, "lerning", cfg_with("train.lerning_rate", 1)),
                          "unknown key 'lerning_rate' (did you mean 'lr'?)"),
    "--set unknown key": (lambda w: train_case(w, "set", None, "--set", "train.lerning_rate=1"),
                          "--set train.lerning_rate: train has no key 'lerning_rate'"),
    "--set without =": (lambda w: train_case(w, "seteq", None, "--set", "train.lr"),
                        "expected KEY=VALUE"),
    "lr not a number": (lambda w: train_case(w, "lrstr", cfg_with("train.lr", "fast")),
                        "train.lr: expected a number"),
    "negative lr": (lambda w: train_case(w, "lrneg", cfg_with("train.lr", -1)),
                    "train.lr must be > 0"),
    "unknown precision": (lambda w: train_case(w, "prec", cfg_with("train.precision", "fp8")),
                          "train.precision: 'fp8' is not one of"),
    "unknown method": (lambda w: train_case(w, "meth", cfg_with("method", {"name": "loar"})),
                       "did you mean 'lora'"),
    "lora rank 0": (lambda w: train_case(w, "r0", cfg_with("method.r", 0)), "method.r"),
    "target matches nothing": (lambda w: train_case(w, "tgt", cfg_with(
        "method.target_modules", ["no_such_proj"])), "no_such_proj"),
    "unknown task": (lambda w: train_case(w, "task", cfg_with("task", "stf")),
                     "did you mean 'sft'"),
    "best_metric not computed": (lambda w: train_case(w, "best", cfg_with(
        "train.best_metric", "val_acuracy")), "train.best_metric: 'val_acuracy' is not computed"),
    "forgetting corpus missing": (lambda w: train_case(w, "forget", cfg_with(
        "eval.forgetting_corpus", "/no/such/corpus.txt")), "/no/such/corpus.txt"),
    "model path missing": (lambda w: train_case(w, "model", cfg_with(
        "model", str(w.root / "no-model"))), "no-model"),
    "resume and overwrite": (lambda w: train_case(w, "ro", None, "--resume"),
                             "--resume and --overwrite contradict"),
    # ---------------------------------------------------------------- train: data
    "data file missing": (lambda w: train_case(w, "nodata", cfg_with(
        "data.train", str(w.root / "missing.jsonl"))), "missing.jsonl"),
    "data empty": (lambda w: train_case(w, "empty", cfg_with(
        "data.train", str(w.write("empty.jsonl", "")))), "empty.jsonl"),
    "data malformed row": (lambda w: train_case(w, "malformed", cfg_with(
        "data.train", str(w.write("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"x": \n')))),
        "bad.jsonl:2: malformed JSON"),
    "data control character": (lambda w: train_case(w, "ctrl", cfg_with(
        "data.train", str(w.write("ctrl.jsonl", '{"instruction": "a\x01", "output": "b"}\n')))),
        "ctrl.jsonl:1: malformed JSON (Invalid control character, column"),
    "data unsupported type": (lambda w: train_case(w, "xml", cfg_with(
        "data.train", str(w.write("rows.xml", "<rows/>")))), "unsupported file type '.xml'"),
    "data without answer field": (lambda w: train_case(w, "noout", cfg_with(
        "data.train", str(w.write("noout.jsonl", '{"instruction": "a"}\n')))), "noout.jsonl:1"),
    "lora target inside a trained head": (lambda w: train_case(w, "pooler", lambda c: c.update(
        model=str(w.bert), task="classification",
        method={"name": "lora", "target_modules": ["query", "key", "value", "dense"]},
        data={"train": str(w.write("cls.jsonl", "".join(
            json.dumps({"text": t, "label": t.split()[0]}) + "\n"
            for t in ["good movie", "bad film", "good fun", "bad movie"])))})),
        "'bert.pooler.dense' lies inside 'bert.pooler'"),
    "classification single class": (lambda w: train_case(w, "onecls", lambda c: c.update(
        task="classification", data={"train": str(w.write(
            "one.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n'))})),
        "one.jsonl"),
    # ---------------------------------------------------------------- train: output dir, resume
    "output_dir is a file": (lambda w: train_case(w, "outfile", cfg_with(
        "output_dir", str(w.write("a-file", "x")))), "is not a directory"),
    "earlier run without --resume": (lambda w: ["train", str(w.write_config("again"))],
                                     "holds an earlier run"),
    "resume without checkpoints": (lambda w: ["train", str(w.write_config("fresh", cfg_with(
        "output_dir", str(w.root / "never-ran")))), "--resume"], "no complete checkpoint"),
    "resume from a non-checkpoint": (lambda w: ["train", str(w.write_config("r2")), "--resume",
                                                str(w.run / "adapter")],
                                     "not a peftlab checkpoint"),
    # ---------------------------------------------------------------- eval
    "eval adapter missing": (lambda w: ["eval", str(w.write_config("ev")), "--adapter",
                                        str(w.root / "does-not-exist")], "does-not-exist"),
    "eval config missing": (lambda w: ["eval", str(w.root / "none.yaml")],
                            "config file not found"),
    # ---------------------------------------------------------------- predict
    "predict adapter missing": (lambda w: ["predict", "--adapter", str(w.root / "nope"),
                                           "--input", str(w.data["train"])],
                                "no such adapter directory"),
    "predict on an sft adapter": (lambda w: ["predict", "--adapter", str(w.run / "adapter"),
                                             "--input", str(w.data["train"])],
                                  "not trained with task: classification"),
    # ---------------------------------------------------------------- chat
    "chat model missing": (lambda w: ["chat", "--model", str(w.root / "no-model"), "--prompt",
                                      "hi"], "no-model"),
    "chat adapter missing": (lambda w: ["chat", "--model", str(w.model), "--adapter",
                                        str(w.root / "no-adapter"), "--prompt", "hi"],
                             "no-adapter"),
    "chat adapter config corrupt": (lambda w: ["chat", "--model", str(w.model), "--adapter",
                                               str(corrupt_copy(w, "adapter_config.json")),
                                               "--prompt", "hi"],
                                    "adapter_config.json: not valid JSON"),
    "chat adapter weights truncated": (lambda w: ["chat", "--model", str(w.model), "--adapter",
                                                  str(corrupt_copy(w, "adapter_model.safetensors")),
                                                  "--prompt", "hi"],
                                       "adapter_model.safetensors: not a readable safetensors"),
    # ---------------------------------------------------------------- export
    "export without target": (lambda w: ["export", "--model", str(w.model)],
                               "give a GGUF file path"),
    "export bad dtype": (lambda w: ["export", "--model", str(w.model), "--gguf",
                                    str(w.root / "m.gguf"), "--dtype", "q4_k"],
                         "dtype: 'q4_k' is not one of"),
    "export gguf under a file": (lambda w: ["export", "--model", str(w.model), "--gguf",
                                            str(w.write("plain", "x") / "m.gguf")],
                                 "is a file"),
    "export hf under a file": (lambda w: ["export", "--model", str(w.model), "--hf",
                                          str(w.write("plain2", "x") / "dir")], "is a file"),
    "export gguf is a directory": (lambda w: ["export", "--model", str(w.model), "--gguf",
                                              str(w.root)], "is a directory"),
    "export adapter missing": (lambda w: ["export", "--model", str(w.model), "--adapter",
                                          str(w.root / "gone"), "--hf", str(w.root / "hf")],
                               "gone"),
    # ---------------------------------------------------------------- sweep
    "sweep grid without =": (lambda w: ["sweep", str(w.write_config("sw")), "--grid",
                                        "train.lr"], "train.lr"),
    "sweep config missing": (lambda w: ["sweep", str(w.root / "none.yaml"), "--grid",
                                        "train.lr=1e-3"], "config file not found"),
    # ---------------------------------------------------------------- serve
    "serve adapter spec": (lambda w: ["serve", "--model", str(w.model), "--adapter", "x"],
                           "expected NAME=DIR"),
    "serve port in use": (lambda w: ["serve", "--model", str(w.model), "--port",
                                     str(w.busy.getsockname()[1])], "cannot listen"),
    "serve max-batch 0": (lambda w: ["serve", "--model", str(w.model), "--max-batch", "0"],
                          "--max-batch must be >= 1"),
    "export gguf-adapter without adapter": (lambda w: ["export", "--model", str(w.model),
                                                       "--gguf-adapter", str(w.root / "a.gguf")],
                                            "--adapter"),
}


def corrupt_copy(w: World, name: str) -> Path:
    """A copy of the earlier run's adapter with ``name`` cut to half its bytes."""
    target = w.root / f"corrupt-{name}"
    if not target.exists():
        shutil.copytree(w.run / "adapter", target)
        data = (target / name).read_bytes()
        (target / name).write_bytes(data[:len(data) // 2])
    return target


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_and_leaves_the_earlier_run(case, world, capsys):
    build, expected = CASES[case]
    world.busy = _busy_port()
    try:
        argv = build(world)
        capsys.readouterr()
        code = main(argv)  # an unexpected exception would fail the test with its traceback
    finally:
        world.busy.close()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("peftlab ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"peftlab {argv[0]}: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(world.run) == world.files, "the earlier run's files changed"


def test_the_matrix_is_wide():
    assert len(CASES) >= 40


def test_a_save_that_would_fail_fails_before_training(tmp_path):
    """The preflight save turns the error the final save would raise (here safetensors'
    shared-memory refusal) into a config error, and writes nothing beside the run."""
    from peftlab.config import ConfigError
    from peftlab.training.recipe import preflight_save

    def save(directory: Path) -> None:
        directory.mkdir()
        raise RuntimeError("Some tensors share memory, this will lead to duplicate memory "
                           "on disk and potential differences when loading them again\nmore")

    with pytest.raises(ConfigError, match="could not be saved after training: Some tensors"):
        preflight_save(save, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
