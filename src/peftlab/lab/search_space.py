"""The search space of ``peftlab sweep --space SPACE.yaml``: which config keys vary, and how.

SPACE.yaml maps config keys to one of three kinds of range (and may carry the search
settings, which command-line flags override)::

    params:
      train.lr: {low: 1.0e-4, high: 3.0e-2, log: true}   # float (low/high not both ints)
      method.r: {low: 2, high: 16, step: 2}              # int (low/high ints)
      method: {choices: [{name: lora, r: 8}, {name: ia3}]}   # categorical, any YAML values
    sampler: tpe            # tpe | random | grid, or {name: tpe, startup_trials: 5}
    pruner: asha            # median | asha | none, or {name: asha, min_resource: 4, ...}
                            # margin: 0.02 -- never prune within 0.02 of the step's best
    trials: 20
    timeout: 1800           # seconds
    workers: 1
    seed: 0

Everything is checked here, before a trial runs, with errors naming the file and the key.
A categorical value that is not a scalar (a ``method`` block, a list of target modules) is
handed to Optuna as its YAML text, since Optuna's categorical choices must be scalars.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from peftlab.config import ConfigError
from peftlab.errors import suggest

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "none")
PRUNER_OPTIONS = {"median": ("startup_trials", "warmup_steps", "margin"),
                  "asha": ("min_resource", "reduction_factor", "margin")}
SAMPLER_OPTIONS = {"tpe": ("startup_trials",)}
SETTINGS = ("params", "sampler", "pruner", "trials", "timeout", "workers", "seed")
Scalar = str | int | float | bool | None


@dataclass
class Param:
    """One varying config key: a float/int range or a list of choices."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Scalar] = field(default_factory=list)

    def suggest(self, trial: optuna.Trial) -> Scalar:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.key, self.choices)

    def grid_values(self, where: str) -> list[Scalar]:
        """The points the grid sampler visits: the choices, or the stepped range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.log:
            raise ConfigError(f"{where}: params.{self.key}: the grid sampler cannot walk a log "
                              "range; list the values as 'choices'")
        if self.step is None and self.kind == "float":
            raise ConfigError(f"{where}: params.{self.key}: the grid sampler needs a 'step' "
                              "(or 'choices') for a float range")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass
class SearchSpace:
    params: list[Param]
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    trials: int | None = None
    timeout: float | None = None
    workers: int = 1
    seed: int = 0
    source: str = "space"

    def suggest(self, trial: optuna.Trial) -> dict[str, str]:
        """Sample every param for ``trial``; returns ``{key: YAML value}`` config overrides,
        a whole block before its keys (``method`` before ``method.r``, which it would reset)."""
        ordered = sorted(self.params, key=lambda p: p.key.count("."))
        return {p.key: override_text(p.suggest(trial)) for p in ordered}

    def grid(self) -> dict[str, list[Scalar]]:
        return {p.key: p.grid_values(self.source) for p in self.params}

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def to_dict(self) -> dict[str, Any]:
        """The settings a worker process needs, as plain data (see :func:`space_from_dict`)."""
        params = {}
        for p in self.params:
            if p.kind == "categorical":
                params[p.key] = {"choices": [_from_choice(c) for c in p.choices]}
            else:
                spec: dict[str, Any] = {"type": p.kind, "low": p.low, "high": p.high,
                                        "log": p.log}
                if p.step is not None:
                    spec["step"] = p.step
                params[p.key] = spec
        pruner: Any = dict(self.pruner_options, name=self.pruner)
        sampler: Any = (dict(self.sampler_options, name=self.sampler) if self.sampler_options
                        else self.sampler)
        return {"params": params, "sampler": sampler, "pruner": pruner,
                "trials": self.trials, "timeout": self.timeout, "workers": self.workers,
                "seed": self.seed}


def override_text(value: Scalar) -> str:
    """A sampled value as the text of a ``key=value`` override (parsed back as YAML)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads "1e-05" as a string, "1.0e-05" as float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def _choice(value: Any) -> Scalar:
    """Optuna's categorical choices are scalars: a mapping or list goes in as its YAML text."""
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return value


def _from_choice(value: Scalar) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return yaml.safe_load(value)
    return value


def load_space(path: str | Path) -> SearchSpace:
    """Read and check SPACE.yaml."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space: {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML: {first}") from None
    return space_from_dict(raw, str(p))


def space_from_dict(raw: Any, source: str = "space") -> SearchSpace:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'params' (config key -> range)")
    for key in raw:
        if key not in SETTINGS:
            raise ConfigError(f"{source}: unknown key {key!r}{suggest(str(key), SETTINGS)}; "
                              f"expected: {', '.join(SETTINGS)}")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{source}: 'params' must map at least one config key to a range, "
                          "e.g. params: {train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}")
    params = [_param(str(key), spec, source) for key, spec in params_raw.items()]
    space = SearchSpace(params, source=source)
    apply_settings(space, {k: v for k, v in raw.items() if k != "params"}, source)
    return space


def apply_settings(space: SearchSpace, settings: dict[str, Any], where: str) -> None:
    """Set sampler/pruner/trials/timeout/workers/seed (from SPACE.yaml or the command line);
    ``None`` values leave the current setting."""
    for key, value in settings.items():
        if value is None:
            continue
        if key == "sampler":
            space.sampler, space.sampler_options = _sampler(value, where)
        elif key == "pruner":
            space.pruner, space.pruner_options = _pruner(value, where)
        elif key in ("trials", "workers", "seed"):
            if isinstance(value, bool) or not isinstance(value, int) or (
                    key != "seed" and value < 1):
                raise ConfigError(f"{where}: {key}: expected a{' positive' if key != 'seed' else 'n'}"
                                  f" integer, got {value!r}")
            setattr(space, key, value)
        elif key == "timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}: timeout: expected seconds > 0, got {value!r}")
            space.timeout = float(value)
        else:
            raise ConfigError(f"{where}: unknown setting {key!r}")


def _named(value: Any, where: str, kind: str, names: Any,
           allowed_options: dict[str, tuple[str, ...]]) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``{name: NAME, option: value, ...}`` of a sampler or pruner: (name, options),
    the name and the option keys checked; the values are the caller's to check."""
    options: dict[str, Any] = {}
    if isinstance(value, dict):
        options = dict(value)
        value = options.pop("name", None)
    if value not in names:
        raise ConfigError(f"{where}: {kind}: {value!r} is not one of {', '.join(names)}")
    allowed = allowed_options.get(value, ())
    for key in options:
        if key not in allowed:
            raise ConfigError(f"{where}: {kind} {value}: unknown option {key!r}"
                              f"{suggest(str(key), allowed)}; expected: "
                              f"{', '.join(allowed) or 'none'}")
    return value, options


def _sampler(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    value, options = _named(value, where, "sampler", SAMPLERS, SAMPLER_OPTIONS)
    for key, v in options.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{where}: sampler {value}: {key}: got {v!r}, expected an "
                              "integer >= 0")
    return value, options


def _pruner(value: Any, where: str) -> tuple[str, dict[str, Any]]:
    value, options = _named(value, where, "pruner", PRUNERS, PRUNER_OPTIONS)
    for key, v in options.items():
        if key == "margin":
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ConfigError(f"{where}: pruner {value}: margin: got {v!r}, expected a "
                                  "number >= 0 (metric units)")
            continue
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            key == "min_resource" and v == "auto")
        if not ok or (key == "reduction_factor" and v < 2):
            raise ConfigError(f"{where}: pruner {value}: {key}: got {v!r}, expected an integer"
                              f" >= {2 if key == 'reduction_factor' else 0}")
    return value, options


def _param(key: str, spec: Any, where: str) -> Param:
    at = f"{where}: params.{key}"
    if key == "output_dir":
        raise ConfigError(f"{at}: output_dir is set per trial (OUTPUT_DIR/trials/...)")
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"{at}: not a config key (expected e.g. train.lr or method.r)")
    if isinstance(spec, list):  # shorthand: a bare list is the choices
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: expected {{low, high[, log, step]}} or {{choices: [...]}}, "
                          f"got {spec!r}")
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        if extra:
            raise ConfigError(f"{at}: 'choices' takes no other keys (got {sorted(extra)})")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: choices: expected a non-empty list")
        values = [_choice(c) for c in choices]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{at}: choices: a value is listed twice")
        return Param(key, "categorical", choices=values)
    allowed = {"low", "high", "log", "step", "type"}
    for k in spec:
        if k not in allowed:
            raise ConfigError(f"{at}: unknown key {k!r}{suggest(str(k), sorted(allowed))}; "
                              "expected low, high, log, step, type or choices")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{at}: a range needs both 'low' and 'high' (or give 'choices')")
    low, high = _number(spec["low"], f"{at}: low"), _number(spec["high"], f"{at}: high")
    if spec.get("step") is not None:
        spec = {**spec, "step": _number(spec["step"], f"{at}: step")}
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high)) else "float")
    if kind not in ("int", "float"):
        raise ConfigError(f"{at}: type: {kind!r} is not int or float")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: log: expected true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{at}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log range needs low > 0 (got {low})")
    step = spec.get("step")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{at}: step must be > 0 and cannot be combined with log")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ConfigError(f"{at}: an int range needs integer low/high/step")
    return Param(key, kind, float(low) if kind == "float" else int(low),
                 float(high) if kind == "float" else int(high), log,
                 None if step is None else (float(step) if kind == "float" else int(step)))


def _number(value: Any, at: str) -> int | float:
    """A range end as a number; YAML reads ``1e-4`` (no dot) as text, as the config loader
    accepts it, so does the search space."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{at}: expected a number, got {value!r}")
