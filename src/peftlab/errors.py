"""The error a user fixes in a config, and the did-you-mean hint every key error carries."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


# Names other tools (transformers' TrainingArguments, peft, TRL) use for our keys: a user
# who types one of them, or a typo of one, is pointed at ours.
SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "eval_steps": "eval_every",
    "save_steps": "save_every", "logging_steps": "log_every", "warmup": "warmup_steps",
    "gradient_checkpointing": "activation_checkpointing", "lora_r": "r", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "metric_for_best_model": "best_metric",
    "per_device_eval_batch_size": "batch_size", "output": "output_dir",
}


def suggest(word: str, choices: list[str]) -> str:
    """" (did you mean 'x'?)" for the closest valid key, also through :data:`SYNONYMS`."""
    pool = {c: c for c in choices}
    pool.update({alias: key for alias, key in SYNONYMS.items() if key in choices})
    close = difflib.get_close_matches(word, list(pool), n=1, cutoff=0.5)
    return f" (did you mean {pool[close[0]]!r}?)" if close else ""


def describe_error(exc: BaseException) -> str:
    """``<what>: <why>`` for one line on stderr."""
    if isinstance(exc, OSError) and exc.strerror:  # raised by the OS, not by our code
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)
