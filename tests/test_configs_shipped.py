"""Every YAML config shipped in configs/ validates."""

from pathlib import Path

import pytest

from peftlab.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.model and cfg.data.train
