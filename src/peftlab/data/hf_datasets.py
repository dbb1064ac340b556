"""Hugging Face ``datasets`` objects handed to the Python API in place of a path: a
``Dataset``/``DatasetDict`` in ``data.train``/``data.validation`` is saved to a directory that
``peftlab.data.readers`` then reads like any ``save_to_disk`` directory (same checks, same
one-line errors). Only objects are touched here, so ``datasets`` itself is never imported.
"""

from __future__ import annotations

import tempfile
from typing import Any

from peftlab.data.readers import DataError


def is_hf_dataset(obj: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (checked without importing datasets)."""
    cls = type(obj)
    return cls.__module__.split(".")[0] == "datasets" and cls.__name__ in ("Dataset",
                                                                             "DatasetDict")


def resolve_data_objects(data: dict[str, Any]) -> dict[str, Any]:
    """``data.train``/``data.validation`` given as Dataset/DatasetDict objects -> directories
    they are saved to (a temporary copy, so a later ``.select``/``.map`` view is what is read).

    A DatasetDict as ``data.train`` gives its ``train`` split, and its ``validation`` split
    when ``data.validation`` is not set; as ``data.validation``, its ``validation`` split."""
    out = dict(data)
    train, validation = data.get("train"), data.get("validation")
    if is_hf_dataset(train) and type(train).__name__ == "DatasetDict":
        train_split = _split(train, "train", "data.train")
        if validation is None and "validation" in train:
            validation = train["validation"]
        train = train_split
    if is_hf_dataset(validation) and type(validation).__name__ == "DatasetDict":
        validation = _split(validation, "validation", "data.validation")
    for key, value in (("train", train), ("validation", validation)):
        if is_hf_dataset(value):
            out[key] = _save(value, f"data.{key}")
        elif value is not None:
            out[key] = value
    return out


def _split(dd: Any, split: str, where: str) -> Any:
    if split not in dd:
        raise DataError(f"{where}: the DatasetDict has no {split!r} split (splits: "
                        f"{', '.join(dd)}); pass the split you mean, e.g. dd[{next(iter(dd))!r}]")
    return dd[split]


def _save(ds: Any, where: str) -> str:
    if len(ds) == 0:
        raise DataError(f"{where}: the Dataset has no rows")
    directory = tempfile.mkdtemp(prefix="peftlab-dataset-")
    ds.save_to_disk(directory)
    return directory
