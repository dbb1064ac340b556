"""Every YAML config shipped in configs/ validates."""

from pathlib import Path

import optuna
import pytest

from peftlab.config import load_config
from peftlab.lab.search_space import load_space

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.model and cfg.data.train


SPACES = sorted((Path(__file__).resolve().parents[1] / "configs" / "spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_search_space_is_valid(path):
    """Each space loads, and a sampled trial's overrides apply to the config it is named for."""
    space = load_space(path)
    base = load_config(path.parents[1] / path.name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        overrides = space.suggest(study.ask())
        load_config(overrides=[f"{k}={v}" for k, v in overrides.items()], base=base.to_dict())
