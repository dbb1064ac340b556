"""peftlab: CPU-first, parameter-efficient fine-tuning of language models."""

from peftlab.api import baseline, evaluate, export, load, merge, merge_adapters, sweep, train
from peftlab.config import ConfigError, RunConfig, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "baseline", "evaluate", "export", "load", "load_config",
           "merge", "merge_adapters", "sweep", "train"]
