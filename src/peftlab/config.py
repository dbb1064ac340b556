"""RunConfig: the single source of option names, defaults and validation.

YAML files, ``--set`` overrides on the CLI and the Python API all become a RunConfig
through :func:`load_config` / :func:`from_dict`. Every key is checked; an unknown key
is an error that names it and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import ConfigError, suggest
from peftlab.plugins import METHODS, TASKS


@dataclass
class CleanConfig:
    """``data.clean``: optional clean-up before tokenization (peftlab.data.clean).

    Every step is off by default and, when on, counted in the data report.
    """

    normalize: bool = False  # Unicode NFKC + whitespace clean-up of every text field
    dedup: bool = False  # drop exact duplicates (hash of the normalised text)
    near_dedup: bool = False  # drop near duplicates (MinHash + LSH over word shingles)
    near_threshold: float = 0.8  # Jaccard similarity of word-shingle sets
    shingle_size: int = 3  # words per shingle
    num_perm: int = 128  # MinHash permutations
    min_tokens: int = 0  # drop rows whose answer has fewer tokens (empty answers: any value >= 1)
    max_tokens: int | None = None  # drop rows whose prompt + answer text has more tokens
    leakage: bool = False  # drop train rows that (nearly) duplicate a validation row

    def validate(self, where: str) -> None:
        if not 0.0 < self.near_threshold <= 1.0:
            raise ConfigError(f"{where}.near_threshold must be in (0, 1], got {self.near_threshold}")
        for key in ("shingle_size", "num_perm"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.min_tokens < 0:
            raise ConfigError(f"{where}.min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < max(1, self.min_tokens):
            raise ConfigError(f"{where}.max_tokens must be >= max(1, min_tokens), "
                              f"got {self.max_tokens}")


@dataclass
class AugmentConfig:
    """``data.augment``: extra training rows for low-data tasks (peftlab.data.augment).

    Applied to the training split only, after splitting and the leakage check; seeded by
    ``train.seed``. ``paraphrase`` and ``synonyms: embedding`` load the model once more.
    """

    method: str = "none"  # none | eda | paraphrase
    copies: int = 1  # augmented rows per training row
    alpha: float = 0.1  # EDA: share of the words each operation changes
    synonyms: str = "builtin"  # EDA: builtin word list | embedding (the model's own neighbours)
    fields: list[str] | None = None  # default: the prompt side (instruction, input, user turns)
    temperature: float = 0.9  # paraphrase sampling
    top_p: float = 0.95
    max_new_tokens: int = 96

    def validate(self, where: str) -> None:
        choice(f"{where}.method", self.method, ["none", "eda", "paraphrase"])
        choice(f"{where}.synonyms", self.synonyms, ["builtin", "embedding"])
        if self.copies < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"{where}: copies and max_new_tokens must be >= 1")
        if not 0.0 < self.alpha <= 0.5:
            raise ConfigError(f"{where}.alpha must be in (0, 0.5], got {self.alpha}")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}: temperature must be > 0 and top_p in (0, 1]")


@dataclass
class DataConfig:
    """Where the examples come from and how rows map to fields."""

    train: str | None = None
    validation: str | None = None
    validation_split: float = 0.0
    format: str = "auto"  # auto | alpaca | chat
    messages_field: str = "messages"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    system_prompt: str | None = None
    on_error: str = "raise"  # raise | skip
    max_rows: int | None = None
    # preference pairs (task: reward, dpo, orpo, simpo, kto) and prompts (task: ppo, grpo)
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    completion_field: str = "completion"  # task: kto, unpaired rows (prompt, completion, label)
    # classification
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list[str | int] | None = None  # fixed label order; default: sorted labels of train
    k_shot: int | None = None  # few-shot: keep exactly k training rows per class (seeded by train.seed)
    # rows sharing this field's value (e.g. a document id) stay on one side of validation_split
    # and of the baseline's cross-validation folds
    group_field: str | None = None
    # SFT data preparation (peftlab.data.clean / templates / packing / augment)
    clean: CleanConfig = field(default_factory=CleanConfig)
    template: str | None = None  # None: chat template | alpaca | a Jinja file | inline Jinja
    packing: bool = False  # pack short training examples into max_length rows (no cross-attention)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # data mixing (task: sft; peftlab.data.mixing). replay: a general-text/instruction file
    # (JSONL/JSON/CSV/TSV/Parquet, or .txt/.raw: one row per non-empty line); replay_ratio:
    # its share of the final training set. Rows with a text_field and no instruction/messages
    # field train with LM loss on the whole text (cut to train.max_length).
    replay: str | None = None
    replay_ratio: float = 0.0
    # multi-task: [{name, train, validation?, weight, format?, template?, system_prompt?,
    # messages_field?, instruction_field?, input_field?, output_field?, max_rows?}, ...].
    # weights are exact shares of mixture_size (default: the sources' training rows summed).
    mixture: list[dict[str, Any]] | None = None
    mixture_size: int | None = None

    def validate(self, where: str) -> None:
        choice(f"{where}.format", self.format, ["auto", "alpaca", "chat"])
        choice(f"{where}.on_error", self.on_error, ["raise", "skip"])
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"{where}.validation_split must be in [0, 1), got {self.validation_split}")
        if self.validation and self.validation_split:
            raise ConfigError(f"{where}: give either 'validation' or 'validation_split', not both")
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise ConfigError(f"{where}.labels must be a non-empty list of unique labels, got {self.labels}")
        if self.group_field is not None and not self.group_field.strip():
            raise ConfigError(f"{where}.group_field must be a field name, got {self.group_field!r}")
        if self.k_shot is not None and self.k_shot < 1:
            raise ConfigError(f"{where}.k_shot must be >= 1 (training rows per class), "
                              f"got {self.k_shot}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ConfigError(f"{where}.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_ratio > 0 and not self.replay:
            raise ConfigError(f"{where}.replay_ratio is {self.replay_ratio} but {where}.replay "
                              "(the replay data file) is not set")
        if self.mixture_size is not None and self.mixture_size < 1:
            raise ConfigError(f"{where}.mixture_size must be >= 1, got {self.mixture_size}")
        if self.mixture_size is not None and self.mixture is None:
            raise ConfigError(f"{where}.mixture_size needs {where}.mixture")
        if self.mixture is not None:
            _validate_mixture(self, where)


# Keys of one ``data.mixture`` entry: name -> accepted Python types.
MIXTURE_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,), "train": (str,), "validation": (str,), "weight": (int, float),
    "format": (str,), "template": (str,), "system_prompt": (str,), "messages_field": (str,),
    "instruction_field": (str,), "input_field": (str,), "output_field": (str,),
    "max_rows": (int,),
}


def _validate_mixture(data: DataConfig, where: str) -> None:
    """Check ``data.mixture`` entries in place (weights become floats); errors name
    ``data.mixture[i].key``."""
    key = f"{where}.mixture"
    if not data.mixture:
        raise ConfigError(f"{key} must be a non-empty list of sources")
    data.mixture = [dict(entry) for entry in data.mixture]  # don't touch the caller's dicts
    for other in ("train", "validation"):
        if getattr(data, other):
            raise ConfigError(f"{where}.{other}: give the files per source in {key} "
                              f"(or drop {key}), not both")
    names = []
    for i, entry in enumerate(data.mixture):
        at = f"{key}[{i}]"
        for k, value in entry.items():
            if k not in MIXTURE_KEYS:
                raise ConfigError(f"{at}: unknown key {k!r}{suggest(str(k), list(MIXTURE_KEYS))}; "
                                  f"valid keys: {', '.join(MIXTURE_KEYS)}")
            allowed = MIXTURE_KEYS[k]
            if value is None and k in ("validation", "template", "system_prompt", "max_rows"):
                continue
            if isinstance(value, bool) or not isinstance(value, allowed):
                kind = "a number" if float in allowed else ("an integer" if int in allowed
                                                            else "a string")
                raise ConfigError(f"{at}.{k}: expected {kind}, got {value!r}")
        for required in ("name", "train"):
            if not entry.get(required):
                raise ConfigError(f"{at}.{required} is required")
        name = entry["name"]
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"{at}.name: {name!r} must use only letters, digits, '_', '-', '.' "
                              "(it names the metrics val_loss/<name>)")
        if name == "replay" or name in names:
            raise ConfigError(f"{at}.name: {name!r} is "
                              + ("reserved for data.replay" if name == "replay" else "used twice"))
        names.append(name)
        entry["weight"] = float(entry.get("weight", 1.0))
        if entry["weight"] < 0:
            raise ConfigError(f"{at}.weight must be >= 0, got {entry['weight']}")
        if "format" in entry:
            choice(f"{at}.format", entry["format"], ["auto", "alpaca", "chat"])
        if entry.get("max_rows") is not None and entry["max_rows"] < 1:
            raise ConfigError(f"{at}.max_rows must be >= 1, got {entry['max_rows']}")
    if sum(e["weight"] for e in data.mixture) <= 0:
        raise ConfigError(f"{key}: at least one source needs weight > 0")


# The experiment trackers train.report_to may name.
REPORT_TO = ("tensorboard", "mlflow")
PRECISIONS = ["auto", "bf16", "fp32"]  # train.precision, --precision of chat and serve


@dataclass
class TrainConfig:
    """The optimisation loop's knobs; consumed by peftlab.training.trainer.Trainer (and a task's own loop)."""

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    max_length: int = 512
    seed: int = 42
    precision: str = "auto"  # auto | bf16 | fp32 (auto: measured per machine)
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 10
    num_threads: int | None = None
    best_metric: str = "val_loss"  # any logged val_* metric; *loss/*ppl lower is better
    early_stopping_patience: int | None = None  # evaluations without improvement
    activation_checkpointing: bool = False  # recompute block activations in backward: less RAM
    # torch.compile (inductor) each transformer block: fused element-wise ops, fewer saved
    # activations; the first step compiles (~30 s for SmolLM2). auto: on where measured to pay
    # (a CPU, >= 50M parameters, >= 50 steps, ~3 min of eager steps left; also under
    # activation_checkpointing; training/compile.py)
    compile: bool | str = "auto"
    # attention kernel while training on a CPU (peftlab.runtime.cpu_attention): auto
    # times SDPA's flash kernel against a grouped softmax(q k^T) v once per shape (up to 1,024
    # keys) and uses the faster; sdpa: always transformers' SDPA call
    attention: str = "auto"  # auto | sdpa
    # on a CPU, glibc keeps freed buffers up to 32 MiB in the process (peftlab.runtime.heap):
    # no page faults on every step's activations; process-wide, so a library caller may say no
    keep_freed_memory: bool = True
    # NEFTune: uniform noise alpha/sqrt(L*d) on the input embeddings in training steps only
    # (peftlab.runtime.neftune; TRL's neftune_noise_alpha; the paper uses 5-15)
    neftune_alpha: float | None = None
    # where the model, batches and optimizer state live (peftlab.runtime.device): auto picks
    # cuda:LOCAL_RANK, else mps, else cpu
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # under torchrun: ddp replicates the model on every rank; fsdp shards parameters,
    # gradients and optimizer state (torch.distributed.fsdp.fully_shard; peftlab.runtime.fsdp)
    distributed: str = "ddp"  # ddp | fsdp
    # Experiment trackers fed from the same records as metrics.jsonl (peftlab.runtime.tracking):
    # tensorboard (event files in OUTPUT_DIR/tensorboard) and/or mlflow (OUTPUT_DIR/mlflow.db).
    report_to: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        choice(f"{where}.scheduler", self.scheduler, ["cosine", "linear", "constant"])
        check_device_spec(self.device, f"{where}.device")
        choice(f"{where}.distributed", self.distributed, ["ddp", "fsdp"])
        for i, name in enumerate(self.report_to):
            choice(f"{where}.report_to[{i}]", name, list(REPORT_TO))
        if len(set(self.report_to)) != len(self.report_to):
            raise ConfigError(f"{where}.report_to: {self.report_to} names a tracker twice")
        choice(f"{where}.precision", self.precision, PRECISIONS)
        choice(f"{where}.attention", self.attention, ["auto", "sdpa"])
        for key in ("batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError(f"{where}.epochs must be > 0 (or set {where}.max_steps)")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if self.neftune_alpha is not None and not self.neftune_alpha > 0:
            raise ConfigError(f"{where}.neftune_alpha must be > 0 (or null: off), "
                              f"got {self.neftune_alpha}")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"{where}.compile: expected true, false or auto, got {self.compile!r}")


@dataclass
class EvalConfig:
    """Evaluation around training (task: sft; peftlab.evaluation.sft_eval).

    ``forgetting_corpus``: perplexity on the first ``forgetting_max_tokens`` tokens of a text
    file, measured on the base model before training and on the tuned model after it.
    ``generate``: greedy answers to the validation prompts after training (and on the base
    model first with ``compare_base``), scored by ROUGE/exact match/BLEU.
    """

    batch_size: int = 8
    max_new_tokens: int = 64
    forgetting_corpus: str | None = None
    forgetting_max_tokens: int = 20000
    forgetting_window: int = 512
    forgetting_stride: int | None = None  # default: forgetting_window // 2
    generate: bool = False
    generate_max_rows: int | None = 200  # validation examples to answer (None: all)
    compare_base: bool = False  # also generate with the base model (before training)

    def validate(self, where: str) -> None:
        for key in ("batch_size", "max_new_tokens", "forgetting_max_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.forgetting_window < 2:
            raise ConfigError(f"{where}.forgetting_window must be >= 2, got {self.forgetting_window}")
        stride = self.forgetting_stride
        if stride is not None and not 1 <= stride <= self.forgetting_window:
            raise ConfigError(f"{where}.forgetting_stride must be in [1, forgetting_window="
                              f"{self.forgetting_window}], got {stride}")
        if self.generate_max_rows is not None and self.generate_max_rows < 1:
            raise ConfigError(f"{where}.generate_max_rows must be >= 1 (or null: all), "
                              f"got {self.generate_max_rows}")
        if self.compare_base and not self.generate:
            raise ConfigError(f"{where}.compare_base needs {where}.generate: true")


@dataclass
class RunConfig:
    """One fine-tuning run. ``method`` holds the registered method's own config dataclass;
    ``sections`` the config dataclass of every registered task that has one (by task name),
    so a YAML file may carry sections for tasks other than the one it runs."""

    model: str
    task: str = "sft"
    method_name: str = "lora"
    method: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/latest"
    # Start from an earlier run's result: its adapter (a run directory or an adapter
    # directory) is loaded into ``model`` and merged before this run's method is applied
    # (peftlab.methods.chain), e.g. classification after continued pre-training.
    init_from: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def task_config(self) -> Any:
        """The running task's own section (None for a task without one, e.g. sft)."""
        return self.sections.get(self.task)

    def to_dict(self) -> dict[str, Any]:
        method = {"name": self.method_name, **dataclasses.asdict(self.method)}
        return {
            "model": self.model,
            "task": self.task,
            "method": method,
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
            "output_dir": self.output_dir,
            "init_from": self.init_from,
            **{name: dataclasses.asdict(section) for name, section in self.sections.items()},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


_CORE_KEYS = ["model", "task", "method", "data", "train", "eval", "output_dir", "init_from"]
_CORE_SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}

def task_sections() -> dict[str, type]:
    """Config section name -> dataclass, for every registered task that has one."""
    return {spec.name: spec.config_cls for spec in TASKS if spec.config_cls is not None}


def top_keys() -> list[str]:
    return _CORE_KEYS + sorted(task_sections())


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict (parsed YAML) into a RunConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    keys = top_keys()
    for key in raw:
        if key not in keys:
            raise ConfigError(f"{source}: unknown key {key!r}{suggest(key, keys)}")
    if "model" not in raw or not raw["model"]:
        raise ConfigError(f"{source}: 'model' is required (an HF id, a local directory, a .gguf file or an embedded alias)")
    task = raw.get("task", "sft")
    TASKS.get(task)  # an unknown task names the key and the known ones

    method_raw = raw.get("method", {"name": "lora"})
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    if not isinstance(method_raw, dict):
        raise ConfigError("method: must be a mapping with at least 'name' (e.g. {name: lora, r: 8})")
    method_raw = dict(method_raw)
    name = method_raw.pop("name", "lora")  # the default method, as when 'method' is absent
    method_cfg = _build(METHODS.get(name).config_cls, method_raw, "method")

    cfg = RunConfig(
        model=str(raw["model"]),
        task=task,
        method_name=name,
        method=method_cfg,
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
        eval=_build(EvalConfig, raw.get("eval") or {}, "eval"),
        output_dir=str(raw.get("output_dir", "runs/latest")),
        init_from=_coerce(raw.get("init_from"), str | None, "init_from"),
        sections={section: _build(cls, raw.get(section) or {}, section)
                  for section, cls in task_sections().items()},
    )
    if cfg.data.k_shot is not None and cfg.task != "classification":
        raise ConfigError(f"data.k_shot only applies to task: classification (task is {task!r})")
    if cfg.data.group_field is not None and cfg.task != "classification":
        raise ConfigError(f"data.group_field only applies to task: classification "
                          f"(task is {task!r})")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML (or start from ``base``), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        source = str(p)
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, source)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML.

    The key is checked against the schema here, so an unknown one is blamed on ``--set``,
    not on the YAML file (``method.*`` keys depend on the method and are checked later)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    _check_override_key(key.strip(), parts)
    node = raw
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part == "method":
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def _check_override_key(key: str, parts: list[str]) -> None:
    keys = top_keys()
    if parts[0] not in keys:
        raise ConfigError(f"--set {key}: unknown key {parts[0]!r}{suggest(parts[0], keys)}")
    cls = {**_CORE_SECTIONS, **task_sections()}.get(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if cls is None:
            return  # method.* (depends on the method) or free-form values
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i])
            raise ConfigError(f"--set {key}: {where} has no key {part!r}{suggest(part, names)}")
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) else None


DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]


def check_device_spec(spec: Any, where: str = "train.device") -> None:
    """``train.device`` syntax: auto | cpu | cuda | cuda:N | mps (availability is checked when
    the run starts, by peftlab.runtime.device.resolve_device)."""
    text = str(spec)
    if text in DEVICE_CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return
    raise ConfigError(f"{where}: {spec!r} is not one of auto, cpu, cuda, cuda:N, mps"
                      f"{suggest(text, DEVICE_CHOICES)}")


def choice(key: str, value: Any, choices: list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {choices}{suggest(str(value), choices)}")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``raw``, checking names and coercing simple types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(str(key), names)}; valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: invalid value {value!r}")
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)  # a nested section, e.g. data.clean
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 2e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value
